"""DecodingPress: compress during generation so memory stays bounded on long outputs.

Every `compression_interval` generated tokens each layer's tail is merged into its segments:
the base press scores segment and tail slots together and the best `length` survive, where
`length` is the segment's size in the store (any allocator's table: uniform, PyramidKV,
AdaKV, ZigZagKV, UNComp). Runs inside the jitted decode loop (`lax.cond`), with no
recompilation; the tail only needs `compression_interval` slots.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, LayerView, layer_view, write_view
from kvjax.hooks import DecodeHook
from kvjax.buckets import bucket_length
from kvjax.observation import Observation, ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, ScorerPress
from kvjax.presses.parts import check_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingPress(DecodeHook):
    """Periodic re-selection over each segment + the tail with a query-free scorer.

    Args:
      press: a ScorerPress that needs no prefill observation (KnormPress, StreamingLLMPress,
        RandomPress): decode-time queries are not kept.
      compression_interval: generated tokens between merges (the tail's capacity).
    """

    press: ScorerPress
    compression_interval: int = 64

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"DecodingPress needs a ScorerPress, got {type(self.press).__name__}")
        if self.press.obs_spec != ObsSpec():
            raise ValueError(f"{type(self.press).__name__} needs prefill observations; a "
                             "DecodingPress needs a query-free scorer (knorm, streaming_llm, "
                             "random)")
        if self.compression_interval < 1:
            raise ValueError(f"{self.compression_interval=} must be >= 1")

    def tail_slots(self, out_len, reserved):
        return bucket_length(self.compression_interval + reserved, minimum=16)

    def merge_layer(self, cache: KVCache, layer) -> KVCache:
        """Merge layer `layer`'s tail into its segments, keeping the best `length` slots."""
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
        both = select.compact(joined, valid, joined.capacity)
        ctx = LayerContext(prompt_len=cache.next_pos, layer_idx=layer,
                           n_layers=cache.n_layers)
        scores = select.mask_invalid(self.press.score(both, Observation(), ctx), both.length)
        mask = select.topk_mask(scores, p.length, p.capacity)
        kept = select.compact(both, mask, p.capacity)
        return dataclasses.replace(cache, store=write_view(store, layer, kept))

    def merge(self, cache: KVCache) -> KVCache:
        """Merge every layer and empty the tail."""
        cache = jax.lax.fori_loop(0, cache.n_layers, lambda l, c: self.merge_layer(c, l), cache)
        tail = dataclasses.replace(cache.tail, count=jnp.zeros_like(cache.tail.count))
        return dataclasses.replace(cache, tail=tail)

    def after_step(self, cache: KVCache) -> KVCache:
        """Merge when the tail holds `compression_interval` tokens (lax.cond)."""
        full = jnp.max(cache.tail.count) >= self.compression_interval
        return jax.lax.cond(full, self.merge, lambda c: c, cache)
