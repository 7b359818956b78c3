"""AdaKV: head-wise adaptive budgets inside a layer over any scorer (arXiv 2407.11550)."""

import dataclasses

import jax.numpy as jnp

from kvjax.presses import select
from kvjax.presses.base import Press, ScorerPress

_SAFE = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaKVPress(Press):
    """Ada-KV (Feng et al. 2024, arXiv 2407.11550), kvpress's variant.

    The layer keeps `K * n_keep` tokens chosen by one top-k over the scores of all its kv
    heads, so heads whose attention is spread out get larger budgets. Safeguard: each head's
    top `alpha_safeguard * n_keep` tokens are always kept. Per-head counts live in
    `prefix.length`; the array capacity is the largest count a head can reach.
    """

    press: ScorerPress
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"AdaKVPress needs a ScorerPress, got {type(self.press).__name__}")
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"{self.alpha_safeguard=} must be in [0, 1]")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @property
    def obs_spec(self):
        return self.press.obs_spec

    def check_prompt(self, min_prompt_len):
        self.press.check_prompt(min_prompt_len)

    def _n_safe(self, n_keep):
        n_safe = jnp.floor(n_keep * self.alpha_safeguard).astype(jnp.int32)
        return jnp.maximum(n_safe, 1) if self.alpha_safeguard > 0 else n_safe

    def compress_layer(self, layer, obs, ctx):
        if self.compression_ratio == 0:
            return layer
        p = layer.prefix
        b, k, c = p.pos.shape
        scores = select.mask_invalid(self.press.score(p, obs, ctx), p.length)
        n_keep = jnp.minimum(self.press.n_keep(p.length, ctx), p.length)  # [B, K]
        cap = self.press.capacity(c, ctx)
        safe = select.topk_mask(scores, jnp.minimum(self._n_safe(n_keep), n_keep), cap)
        scores = jnp.where(safe, _SAFE, scores)
        total = jnp.sum(n_keep, axis=1, keepdims=True)  # [B, 1]
        flat = select.topk_mask(scores.reshape(b, 1, k * c), total, k * cap).reshape(b, k, c)
        return dataclasses.replace(layer, prefix=select.compact(p, flat, self.capacity(c, cap, k)))

    def capacity(self, n_slots: int, cap: int, n_kv: int) -> int:
        """Largest per-head count: all of the layer's budget minus the others' safeguards."""
        # n * (K - (K-1) * alpha) grows with n, so the largest per-row budget `cap` bounds it;
        # the -1 absorbs the floor in the safeguard count of shorter rows.
        n_safe = max(0, int(cap * self.alpha_safeguard) - 1)
        return min(n_slots, n_kv * cap - (n_kv - 1) * n_safe)
