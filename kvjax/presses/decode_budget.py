"""Decode budgets: how many entries each (layer, kv head) segment keeps after a decode-time
merge (`kvjax.DecodingPress(budget=...)`).

A budget is a frozen dataclass with two methods:
  * `room(width, seen_bound)`: static slots every segment gets in the store (width = what
    the prefill compression keeps at most, seen_bound = prompt bucket + generated-token
    buffer), or None when segments keep their sizes. A segment that may change size needs
    its own room: packed end to end (per-layer and per-head budgets), it would grow into
    its neighbour;
  * `keep(length, n_valid, seen, scores)`: the traced budget [B, K] of one merge.
The budget of each merge is computed inside the jitted loop (a new prompt or output never
recompiles). A threshold is a value the loop traces (`value_fields`, kvjax/values.py): a new
threshold never recompiles. A size or a ratio sets the store's room, a static shape, so a new
one compiles once, like a press's compression_ratio.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.presses.parts import check_fields


@dataclasses.dataclass(frozen=True)
class KeepSize:
    """Every segment keeps the size the prefill compression gave it (the default): memory is
    bounded by the compressed prompt plus `compression_interval` tail slots."""

    value_fields = ()  # sizes and ratios shape the store: static (kvjax/values.py)

    def room(self, width: int, seen_bound: int) -> int | None:
        return None

    def keep(self, length, n_valid, seen, scores) -> jax.Array:
        """length [B, K] current sizes, n_valid [B, K] candidates -> [B, K]."""
        return jnp.minimum(length, n_valid)

    def least(self) -> int | None:
        return None


@dataclasses.dataclass(frozen=True)
class FixedSize:
    """Every (layer, kv head) holds at most `size` entries, prompt and generated tokens
    together (kvpress's `DecodingPress(target_size=...)`); it grows to `size`, then stays."""

    size: int
    value_fields = ()

    def __post_init__(self):
        check_fields(self)
        if self.size < 1:
            raise ValueError(f"FixedSize({self.size=}) must keep at least one entry")

    def room(self, width, seen_bound):
        return max(self.size, width)

    def keep(self, length, n_valid, seen, scores):
        return jnp.minimum(self.size, n_valid)

    def least(self):
        return self.size


@dataclasses.dataclass(frozen=True)
class RatioOfSeen:
    """Every (layer, kv head) holds ceil((1 - compression_ratio) * n) entries, n the tokens
    processed so far (prompt and generated: kvpress's ratio decoding budget, kvpress #230)."""

    compression_ratio: float
    value_fields = ()

    def __post_init__(self):
        check_fields(self)
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"RatioOfSeen({self.compression_ratio=}) must be in [0, 1)")

    def room(self, width, seen_bound):
        return max(width, math.ceil(round((1 - self.compression_ratio) * seen_bound, 6)))

    def keep(self, length, n_valid, seen, scores):
        n = jnp.ceil(jnp.round((1 - self.compression_ratio) * seen.astype(jnp.float32), 4))
        return jnp.minimum(n.astype(jnp.int32)[:, None], n_valid)

    def least(self):
        return None


@dataclasses.dataclass(frozen=True)
class ScoreThreshold:
    """Every entry whose score reaches `threshold` survives (protected entries always), so the
    budget follows the input; only for scorers on a calibrated log scale (KVzap). The store
    reserves room for every token the request may see: its bytes are the bound, while
    `memory_report(...).prefix_tokens` counts what is kept."""

    threshold: float
    value_fields = ("threshold",)  # data: a new threshold never recompiles

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.threshold, jax.core.Tracer):
            object.__setattr__(self, "threshold", float(self.threshold))  # one traced dtype

    def room(self, width, seen_bound):
        return max(width, seen_bound)

    def keep(self, length, n_valid, seen, scores):
        return jnp.minimum(jnp.sum(scores >= self.threshold, axis=-1).astype(jnp.int32),
                           n_valid)

    def least(self):
        return None


BUDGETS = (KeepSize, FixedSize, RatioOfSeen, ScoreThreshold)
