"""A request to the engine and what it returns."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class RequestResult:
    """tokens: generated ids (the EOS that ended it included, as `kvjax.generate` counts
    them); text: decoded (None without a tokenizer); finish_reason: "stop" (EOS or a stop
    string), "length" (max_new_tokens), "cancelled" or "error"; error: why it failed."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    error: str = ""


@dataclasses.dataclass(eq=False)
class Request:
    """One submitted request (mutable host record owned by its `kvjax.Engine`).

    Attributes:
      id: the engine's sequence number; ids: context ids to prefill and compress (None for
      a compressed context); question_ids: ids appended after compression;
      context: the `CompressedContext` it is answered from, or None; plan: its
      `kvjax.plan.RequestPlan` (None for a compressed context); max_new_tokens; sampler;
      eos_ids [MAX_EOS]; stop: stop strings; rng: its PRNG key.
      status, slot, tokens (generated so far), finish_reason, error, kept (pool slots its
      compressed store spans; a shared context counts once in the pool), kv_bytes (bytes of
      the pool block holding them).
    """

    id: int
    ids: list[int] | None
    question_ids: list[int]
    context: Any
    plan: Any
    max_new_tokens: int
    sampler: Any
    eos_ids: tuple[int, ...]
    stop: tuple[str, ...]
    rng: Any
    status: Status = Status.WAITING
    slot: int | None = None
    block: Any = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    text: str | None = None
    kept: int = 0
    kv_bytes: int = 0
    submitted_step: int = 0
    first_token_time: float | None = None
    submit_time: float = 0.0
    finish_time: float | None = None
    _engine: Any = dataclasses.field(default=None, repr=False)
    _pending: Any = dataclasses.field(default=None, repr=False)  # compressed, not yet placed
    _tail: int = dataclasses.field(default=0, repr=False)  # tokens in its slot's tail
    _rng: Any = dataclasses.field(default=None, repr=False)  # its slot's key when preempted
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED

    def result(self) -> RequestResult:
        """The result, running the engine until this request is done."""
        while not self.done:
            self._engine.step()
        return RequestResult(tokens=list(self.tokens), text=self.text,
                             finish_reason=self.finish_reason, error=self.error)


def as_id_list(x) -> list[int] | None:
    """A flat list of token ids if `x` is one prompt of ids (list, tuple, 1-D array), else
    None (text or a compressed context). Non-integer entries are left for the plan's check."""
    if isinstance(x, (list, tuple)) and all(not isinstance(t, (str, bytes)) for t in x):
        return list(x)
    if isinstance(x, np.ndarray) or type(x).__name__ == "ArrayImpl":
        arr = np.asarray(x)
        if arr.ndim != 1:
            raise ValueError(f"token ids of shape {arr.shape}: submit one prompt (1-D) per "
                             "request")
        return list(arr)
    return None
