"""One request plan: every check a prefill needs, run once, before anything is traced.

`plan_request` is the single place where a request's inputs are validated and turned into
the static choices of the two jitted primitives (`kvjax.prefill.prefill_prompt` and
`compress_prompt`): token ids (integer dtype, inside the vocabulary), the press and decode
hook (`check_hooks`), the batch against the mesh, the context length, the press's
own prompt-length requirement, the store's quantization and the tail's size. `generate`,
`generate_stream`, `Pipeline`, `kvjax eval`, the KVzap trainer and the serving engine all
plan through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvjax.attention import resolve_attn_impl
from kvjax.buckets import as_rows, bucket_length, pad_prompts
from kvjax.compress import obs_spec_for
from kvjax.hooks import DecodeHook, hook_or_default
from kvjax.model import check_hook_support, check_model_fn
from kvjax.observation import ObsSpec
from kvjax.presses.base import check_press_arg
from kvjax.quant import resolve_kv_quant
from kvjax.sharding import check_batch, mesh_of


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """A validated request: padded prompts plus the static choices of prefill and compress.

    Attributes:
      tokens: [B, T_bucket] int32 right-padded prompts; lengths: [B] int32 true lengths.
      press: the press (tokenizer bound), or None for the full cache.
      hook: the decode hook the cache carries (the press's own or a `DecodingPress`), or None.
      quant: the store's `kvjax.quant.KVQuant`, or None.
      attn_impl: the resolved attention implementation.
      out_len: generated-token buffer (a bucket of max_new_tokens + tail_extra; 0 without
        decoding); tail_capacity: tail slots the compressed cache reserves.
      mesh: the model's mesh (`fn.mesh`), or None.
      question_len: [B] int32 question tokens ending each prompt, or None (unknown).
    """

    tokens: np.ndarray = dataclasses.field(repr=False)
    lengths: np.ndarray
    press: Any
    hook: Any
    quant: Any
    attn_impl: str
    out_len: int
    tail_capacity: int
    mesh: Any = None
    question_len: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def question_rows(self) -> int:
        """Query rows the prefill must keep for a press that reads the question's span (a
        bucket of the longest question), else 0."""
        if self.question_len is None or self.press is None or not self.press.obs_spec.question:
            return 0
        return bucket_length(int(self.question_len.max()), minimum=16)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def prefill_parts(self, *, observer: bool = True) -> dict:
        """The static arguments of `kvjax.prefill.prefill_prompt` for this plan's press (the
        observation window widened to the question when the press reads its span)."""
        parts = prefill_parts(self.press, self.hook, observer=observer)
        if self.question_rows:
            parts["obs_spec"] = parts["obs_spec"].merge(ObsSpec(window=self.question_rows))
        return parts

    @property
    def decode_len(self) -> int:
        """Generated tokens a decode hook may grow segments for (0 without a hook)."""
        return 0 if self.hook is None else self.out_len

    def compress_parts(self) -> dict:
        """The static arguments of `kvjax.prefill.compress_cache` for this plan."""
        return dict(tail_capacity=self.tail_capacity, hook=self.hook, quant=self.quant,
                    mesh=self.mesh, decode_len=self.decode_len)


def check_hooks(press, decoding_press):
    """The one decode hook of a generate call: the press's or `decoding_press`, not both.

    Raises ValueError when either is not an instance (a class or a registry name)."""
    check_press_arg(press)
    if decoding_press is not None and not isinstance(decoding_press, DecodeHook):
        raise ValueError(f"decoding_press={decoding_press!r} is not a decode hook (e.g. "
                         "kvjax.DecodingPress(press=kvjax.KnormPress(...)))")
    own = None if press is None else press.decode_hook
    if own is not None and decoding_press is not None:
        raise ValueError(f"{type(press).__name__} brings its own decode hook "
                         f"({type(own).__name__}); it cannot be combined with "
                         f"{type(decoding_press).__name__}")
    hook = own if own is not None else decoding_press
    if hook is not None:
        hook.check_press(press)
    return hook


def prefill_parts(press, hook=None, *, observer: bool = True) -> dict:
    """What a press (and the cache's decode hook) needs from the prefill: the observation
    spec, the between-layers hook and (unless `observer=False`) the prompt observer."""
    return dict(obs_spec=obs_spec_for(press, hook),
                between=None if press is None else press.between_layers,
                observer=None if press is None or not observer else press.prompt_observer)


def split_model(model):
    """`model.kvjax_split()` -> (fn, params); TypeError naming the object when it is not a
    kvjax model (e.g. a transformers model, a path, or None: load one with `models.load`)."""
    split = getattr(model, "kvjax_split", None)
    if not callable(split):
        raise TypeError(f"model of type {type(model).__name__} has no kvjax_split(): pass a "
                        "model from models.load(...) or one implementing the contract in "
                        "docs/loading.md")
    fn, params = split()
    check_model_fn(fn)
    return fn, params


def check_token_ids(rows, vocab_size: int | None) -> None:
    """Raise ValueError unless every row holds integer ids in [0, vocab_size).

    Args:
      rows: a list of 1-D arrays or sequences (one prompt each).
      vocab_size: the model's vocabulary (`fn.vocab_size`); None checks only `id >= 0`.
    """
    for i, row in enumerate(rows):
        arr = np.asarray(row)
        if arr.size == 0:
            continue
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
            if arr.dtype != object and np.issubdtype(arr.dtype, np.bool_):
                raise ValueError(f"token ids of prompt {i} are bool; pass integer ids")
            raise ValueError(f"token ids of prompt {i} have dtype {arr.dtype}; token ids "
                             "must be integers (got e.g. "
                             f"{arr.reshape(-1)[0]!r})")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"token id {lo} in prompt {i} is negative")
        if vocab_size is not None and hi >= vocab_size:
            raise ValueError(f"token id {hi} in prompt {i} is outside the model's "
                             f"vocabulary ({vocab_size=})")


def check_budget(fn, prompt_len: int, max_new_tokens: int) -> None:
    """Validate max_new_tokens and the model's context length (clear errors, before jit)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"{max_new_tokens=} must be a non-negative int")
    if prompt_len > fn.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} exceeds the model's context "
                         f"{fn.max_seq_len=}")
    if prompt_len + max_new_tokens > fn.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + {max_new_tokens=} exceeds the "
                         f"model's context {fn.max_seq_len=}")


def plan_request(fn, input_ids, *, max_new_tokens: int, press=None, decoding_press=None,
                 kv_dtype=None, tail_extra: int = 0, attn_impl: str = "auto", tokenizer=None,
                 decode: bool = True, question_len=None) -> RequestPlan:
    """Validate a request and choose its static shapes.

    Args:
      fn: the functional model (`model.kvjax_split()[0]`): `max_seq_len`, optional
        `vocab_size` and `mesh`.
      input_ids: one prompt (a list of ids) or a ragged batch of them, or an int array.
      max_new_tokens: tokens to generate at most (>= 0).
      press, decoding_press: the compression press (None: full cache) and an optional
        decode-time hook; incompatible pairs are refused here.
      kv_dtype: None, "int8", "float8_e4m3fn" or a `kvjax.quant.KVQuant`.
      tail_extra: tokens appended before decoding (a question) that the tail must hold.
      tokenizer: binds what the press needs from it (`Press.with_tokenizer`), if given.
      decode: False plans a compression only (`Pipeline.compress`): no tail, no buffer.
      question_len: per prompt, how many of its last tokens are the question (an int for
        one prompt, or one per prompt), or None; presses that read the question's span get
        it as an observation (`kvjax.observation.Observation.question_len`).

    Returns:
      RequestPlan.
    """
    hook = check_hooks(press, decoding_press)
    check_hook_support(fn, press)
    if tokenizer is not None and press is not None:
        press = press.with_tokenizer(tokenizer)
    if isinstance(tail_extra, bool) or not isinstance(tail_extra, (int, np.integer)) \
            or tail_extra < 0:
        raise ValueError(f"{tail_extra=} must be a non-negative int")
    rows = as_rows(input_ids)
    check_token_ids(rows, getattr(fn, "vocab_size", None))
    tokens, lengths = pad_prompts(rows)
    mesh = mesh_of(fn)
    check_batch(mesh, len(lengths))
    check_budget(fn, int(lengths.max()) + tail_extra, max_new_tokens)
    if press is not None:
        press.check_prompt(int(lengths.min()))
    if decode:
        out_len = bucket_length(max_new_tokens + tail_extra)
        tail = hook_or_default(hook).tail_slots(out_len, tail_extra)
    else:
        out_len = tail = 0
    return RequestPlan(tokens=tokens, lengths=lengths, press=press, hook=hook,
                       quant=resolve_kv_quant(kv_dtype), attn_impl=resolve_attn_impl(attn_impl),
                       out_len=out_len, tail_capacity=tail, mesh=mesh,
                       question_len=check_question_len(question_len, lengths))


def check_question_len(question_len, lengths: np.ndarray) -> np.ndarray | None:
    """question_len as [B] int32, each in [0, length]; ValueError naming it otherwise."""
    if question_len is None:
        return None
    q = np.atleast_1d(np.asarray(question_len))
    if q.dtype.kind not in "iu" or q.shape != lengths.shape:
        raise ValueError(f"{question_len=} must be an int per prompt ({len(lengths)} prompts)")
    if (q < 0).any() or (q > lengths).any():
        raise ValueError(f"{question_len=} is outside the prompt: each must be in [0, its "
                         f"length] (lengths {lengths.tolist()})")
    return q.astype(np.int32)
