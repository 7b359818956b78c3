"""DecodingPress: compress during generation so memory stays bounded on long outputs.

Every `compression_interval` generated tokens the tail is merged into the prefix: the base
press scores prefix and tail slots together and the best `C` survive, where `C` is the
prefix's static capacity. Runs inside the jitted decode loop (`lax.cond`), with no
recompilation; the tail only needs `compression_interval` slots.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, LayerCache, Prefix
from kvjax.observation import Observation, ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, ScorerPress


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingPress:
    """Periodic re-selection over prefix + tail with a query-free scorer.

    Args:
      press: a ScorerPress that needs no prefill observation (KnormPress, StreamingLLMPress,
        RandomPress): decode-time queries are not kept.
      compression_interval: generated tokens between merges (the tail's capacity).
    """

    press: ScorerPress
    compression_interval: int = 64

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"DecodingPress needs a ScorerPress, got {type(self.press).__name__}")
        if self.press.obs_spec != ObsSpec():
            raise ValueError(f"{type(self.press).__name__} needs prefill observations; a "
                             "DecodingPress needs a query-free scorer (knorm, streaming_llm, "
                             "random)")
        if self.compression_interval < 1:
            raise ValueError(f"{self.compression_interval=} must be >= 1")

    def merge_layer(self, layer: LayerCache, ctx: LayerContext) -> LayerCache:
        """Merge the tail into the prefix, keeping the best `C` valid slots."""
        if hasattr(layer, "parts"):
            raise ValueError("DecodingPress cannot merge a head-grouped (UNComp) cache; "
                             "UNCompPress(decode='ring') bounds decode memory itself")
        p, t = layer.prefix, layer.tail
        if p.channels is not None:
            raise ValueError("DecodingPress cannot merge into thin (ThinK) prefix keys")
        both = Prefix(k=jnp.concatenate([p.k, t.k.astype(p.k.dtype)], 2),
                      v=jnp.concatenate([p.v, t.v.astype(p.v.dtype)], 2),
                      pos=jnp.concatenate([p.pos, jnp.broadcast_to(t.pos[:, None],
                                                                   t.k.shape[:3])], 2),
                      length=p.length + t.count[:, None])
        valid = jnp.concatenate([jnp.arange(p.capacity) < p.length[..., None],
                                 (jnp.arange(t.capacity) < t.count[:, None])[:, None]
                                 .repeat(p.k.shape[1], 1)], axis=2)
        scores = jnp.where(valid, self.press.score(both, Observation(), ctx), -jnp.inf)
        n_keep = jnp.minimum(jnp.sum(valid, -1), p.capacity)
        mask = select.topk_mask(scores, n_keep, p.capacity)
        tail = dataclasses.replace(t, count=jnp.zeros_like(t.count))
        return LayerCache(prefix=select.compact(both, mask, p.capacity), tail=tail)

    def maybe_merge(self, cache: KVCache) -> KVCache:
        """Merge every layer when the tail holds `compression_interval` tokens (lax.cond)."""
        n = len(cache.layers)

        def merge(c):
            return dataclasses.replace(c, layers=tuple(
                self.merge_layer(l, LayerContext(c.next_pos, i, n))
                for i, l in enumerate(c.layers)))

        full = jnp.max(cache.layers[0].tail.count) >= self.compression_interval
        return jax.lax.cond(full, merge, lambda c: c, cache)
