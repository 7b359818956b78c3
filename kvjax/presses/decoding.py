"""DecodingPress: compress during generation so memory stays bounded on long outputs.

Every `compression_interval` generated tokens each layer's tail is merged into its segments:
the base press scores segment and tail slots together and the best `length` survive, where
`length` is the segment's budget (`kvjax.presses.decode_budget`: by default its size in the
store, over any allocator's table: uniform, PyramidKV, AdaKV, ZigZagKV, UNComp). Runs inside
the jitted decode loop (`lax.cond`), with no recompilation; the tail only needs
`compression_interval` slots.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, LayerView, layer_view, write_view
from kvjax.hooks import DecodeHook
from kvjax.buckets import bucket_length
from kvjax.presses.decode_budget import (BUDGETS, FixedSize, KeepSize, RatioOfSeen,
                                         ScoreThreshold)
from kvjax.observation import Observation, ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, ScorerPress
from kvjax.presses.parts import check_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingPress(DecodeHook):
    """Periodic re-selection over each segment + the tail.

    Args:
      press: a ScorerPress that needs no prefill observation (KnormPress, StreamingLLMPress,
        RandomPress, KeyDiffPress): decode-time queries are not kept.
      compression_interval: generated tokens between merges (the tail's capacity).
      budget: what each (layer, kv head) keeps after a merge (`kvjax.presses.decode_budget`):
        `KeepSize()` (the default: the size the prefill gave it), `FixedSize(n)` (kvpress's
        target_size), `RatioOfSeen(r)` ((1 - r) of the tokens processed so far) or
        `ScoreThreshold(t)` (scorers on a log scale only). Growing budgets get their room in
        the store when the prompt is compressed.
      window_size: the most recent tokens every merge keeps whatever their score.
    """

    press: ScorerPress
    compression_interval: int = 64
    budget: KeepSize | FixedSize | RatioOfSeen | ScoreThreshold = KeepSize()
    window_size: int = 0

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"DecodingPress needs a ScorerPress, got {type(self.press).__name__}")
        if self.press.obs_spec != ObsSpec():
            raise ValueError(f"{type(self.press).__name__} needs prefill observations; a "
                             "DecodingPress needs a query-free scorer (knorm, streaming_llm, "
                             "random, keydiff)")
        if self.compression_interval < 1:
            raise ValueError(f"{self.compression_interval=} must be >= 1")
        if not isinstance(self.budget, BUDGETS):
            raise ValueError(f"budget={self.budget!r} must be one of "
                             f"{', '.join(b.__name__ for b in BUDGETS)} "
                             "(kvjax.presses.decode_budget)")
        if isinstance(self.budget, ScoreThreshold) and self.press.score_scale != "log":
            raise ValueError(f"{type(self.press).__name__} scores have no calibrated scale, so "
                             f"{self.budget} means nothing: a decode threshold needs log "
                             "scores (KVzapPress)")
        least = self.budget.least()
        protected = self.n_sink + self.window_size
        if least is not None and least < protected:
            raise ValueError(f"{self.budget} is below the {self.n_sink} sinks plus the "
                             f"{self.window_size=} that every merge keeps ({protected})")

    @property
    def n_sink(self) -> int:
        """Entries the scorer always keeps at the start (StreamingLLM's sinks), 0 if none."""
        return int(getattr(self.press, "n_sink", 0))

    def tail_slots(self, out_len, reserved):
        return bucket_length(self.compression_interval + reserved, minimum=16)

    def segment_room(self, width, seen_bound):
        return self.budget.room(width, seen_bound)

    def candidates(self, cache: KVCache, layer) -> tuple[LayerView, jax.Array]:
        """Layer `layer`'s segment and tail slots, valid ones first -> (view [B, K, M + S],
        room [] of the segment)."""
        store, t = cache.store, cache.tail.layer(layer)
        p = layer_view(store, layer)
        count = jnp.minimum(t.count, t.capacity)
        pos_t = jnp.broadcast_to(t.pos[:, None], t.k.shape[:3])
        valid = jnp.concatenate([jnp.arange(p.capacity) < p.length[..., None],
                                 jnp.broadcast_to(jnp.arange(t.capacity) < count[:, None, None],
                                                  pos_t.shape)], axis=2)
        joined = LayerView(k=jnp.concatenate([p.k, t.k.astype(p.k.dtype)], 2),
                           v=jnp.concatenate([p.v, t.v.astype(p.v.dtype)], 2),
                           pos=jnp.concatenate([p.pos, pos_t], 2), length=p.length)
        # valid candidates first (segment, then tail), so `length` means what it says
        return select.compact(joined, valid, joined.capacity), p

    def merge_layer(self, cache: KVCache, layer) -> KVCache:
        """Merge layer `layer`'s tail into its segments, keeping each segment's budget."""
        both, p = self.candidates(cache, layer)
        ctx = LayerContext(prompt_len=cache.next_pos, layer_idx=layer,
                           n_layers=cache.n_layers)
        scores = self.press.score(both, Observation(), ctx)
        recent = both.pos >= (cache.next_pos - self.window_size)[:, None, None]
        scores = select.mask_invalid(jnp.where(recent, jnp.inf, scores), both.length)
        n = jnp.minimum(self.budget.keep(p.length, both.length, cache.next_pos, scores),
                        p.capacity)
        kept = select.compact(both, select.topk_mask(scores, n, p.capacity), p.capacity)
        return dataclasses.replace(cache, store=write_view(cache.store, layer, kept,
                                                           resize=True))

    def merge(self, cache: KVCache) -> KVCache:
        """Merge every layer and empty the tail."""
        cache = jax.lax.fori_loop(0, cache.n_layers, lambda l, c: self.merge_layer(c, l), cache)
        tail = dataclasses.replace(cache.tail, count=jnp.zeros_like(cache.tail.count))
        return dataclasses.replace(cache, tail=tail)

    def after_step(self, cache: KVCache) -> KVCache:
        """Merge when the tail holds `compression_interval` tokens (lax.cond)."""
        full = jnp.max(cache.tail.count) >= self.compression_interval
        return jax.lax.cond(full, self.merge, lambda c: c, cache)
