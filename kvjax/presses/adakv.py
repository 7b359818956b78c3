"""AdaKV: head-wise adaptive budgets inside a layer over any scorer (arXiv 2407.11550)."""

import dataclasses

import jax.numpy as jnp

from kvjax.presses import select
from kvjax.presses.base import Press, ScorerPress, WrapperPress, derive_ratio
from kvjax.presses.parts import check_fields
from kvjax.presses.parts import Allocator, LayerwiseAllocator, Stage, StaticSize

_SAFE = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AdaKV(Allocator):
    """Per-head budgets: the layer keeps the sum of `inner`'s budgets, chosen by one top-k over
    the scores of all its kv heads; each head's top `alpha_safeguard * n_keep` is kept first.

    The top-k over the layer's heads is a threshold, so each head's kept set is its own
    top-(count) by score: the budget is the count, and any selector can take it.
    """

    inner: LayerwiseAllocator
    alpha_safeguard: float = 0.2

    def _n_safe(self, n_keep):
        n_safe = jnp.floor(n_keep * self.alpha_safeguard).astype(jnp.int32)
        return jnp.maximum(n_safe, 1) if self.alpha_safeguard > 0 else n_safe

    def layer_stat(self, view, obs, scores, ctx):
        b, k, c = scores.shape
        n_keep = self.inner.layer_budgets(view.length, ctx.layer_idx, ctx.n_layers)  # [B, K]
        safe = select.topk_mask(scores, jnp.minimum(self._n_safe(n_keep), n_keep), c)
        boosted = jnp.where(safe, _SAFE, scores)
        total = jnp.sum(n_keep, axis=1, keepdims=True)  # [B, 1]
        flat = select.topk_mask(boosted.reshape(b, 1, k * c), total, k * c).reshape(b, k, c)
        return jnp.sum(flat, axis=-1).astype(jnp.int32)  # [B, K]

    def budgets(self, n_valid, stats, prompt_len):
        return stats.transpose(1, 0, 2)  # [L, B, K] -> [B, L, K]

    def capacity(self, size, n_kv):
        base = self.inner.capacity(size, n_kv)
        segs = []
        for seg, cap in zip(size.segments, base.segments):
            # largest per-head count: the layer's budget minus the other heads' safeguards
            # (n * (K - (K-1) alpha) grows with n, so the largest per-row budget bounds it;
            # the -1 absorbs the floor in the safeguard count of shorter rows)
            n_safe = max(0, int(cap * self.alpha_safeguard) - 1)
            segs.append(min(seg, n_kv * cap - (n_kv - 1) * n_safe))
        return StaticSize(tuple(segs), base.total)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaKVPress(WrapperPress):
    """Ada-KV (Feng et al. 2024, arXiv 2407.11550), kvpress's variant, over any scorer.

    The layer keeps `K * n_keep` tokens chosen by one top-k over the scores of all its kv
    heads, so heads whose attention is spread out get larger budgets. Safeguard: each head's
    top `alpha_safeguard * n_keep` tokens are always kept. The per-head budgets are segment
    sizes in the store, so the bytes held are the kept entries. `compression_ratio` is the
    wrapped press's. A `WrapperPress`: the stage is the wrapped press's with AdaKV as its
    allocator; every other member forwards to the wrapped press.
    """

    press: Press
    alpha_safeguard: float = 0.2
    compression_ratio: float | None = None  # the wrapped press's (derive_ratio)

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"AdaKVPress needs a ScorerPress, got {type(self.press).__name__}")
        if not isinstance(self.press.allocator(), LayerwiseAllocator):
            raise ValueError(f"AdaKVPress cannot redistribute the budgets of "
                             f"{type(self.press).__name__} (its allocator is not per layer)")
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"{self.alpha_safeguard=} must be in [0, 1]")
        derive_ratio(self, self.press.compression_ratio)
        super().__post_init__()

    def stages(self):
        if self.compression_ratio == 0:
            return ()
        return (Stage(scorer=self.press, allocator=AdaKV(self.press.allocator(),
                                                         self.alpha_safeguard),
                      selector=self.press.selector()),)
