"""PyramidKV: SnapKV scores with layer budgets decreasing linearly with depth
(arXiv 2406.02069)."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.presses.parts import LayerwiseAllocator, StaticSize, static_budget_max
from kvjax.presses.snapkv import SnapKVPress


def pyramid_budget(q_len, layer_idx: int, n_layers: int, compression_ratio: float,
                   window_size: int, beta: float, xp=jnp):
    """Kept tokens of layer `layer_idx` for prompt length(s) `q_len` (kvpress's formula).

    The average budget over layers is `q_len * (1 - r)` (plus the window); the first layer
    gets `max_num`, the last `min_num = (budget - window) / beta`. Falls back to the uniform
    budget when the pyramid does not fit (short prompts). `xp` is numpy or jax.numpy.
    """
    q_len = xp.asarray(q_len).astype(xp.float32 if xp is jnp else np.float64)
    prefix_budget = q_len * (1 - compression_ratio)
    min_num = prefix_budget / beta
    max_num = prefix_budget * 2 - min_num
    clipped = max_num >= q_len - window_size
    max_num = xp.where(clipped, q_len - window_size, max_num)
    min_num = xp.where(clipped, prefix_budget * 2 - max_num, min_num)
    ok = (q_len >= max_num) & (max_num >= min_num) & (min_num >= window_size)
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0 * max_num
    pyramid = xp.round(max_num - layer_idx * steps)
    fallback = xp.maximum(1, xp.round(q_len * (1 - compression_ratio)))
    return xp.where(ok, pyramid, fallback).astype(xp.int32)


@dataclasses.dataclass(frozen=True)
class Pyramid(LayerwiseAllocator):
    """PyramidKV's layer budgets (`pyramid_budget`), clipped to [1, n_valid]."""

    compression_ratio: float
    window_size: int
    beta: float

    def _budget(self, n, layer_idx, n_layers, xp):
        return pyramid_budget(n, layer_idx, n_layers, self.compression_ratio, self.window_size,
                              self.beta, xp)

    def layer_budgets(self, n_valid, layer_idx, n_layers):
        b = jnp.clip(self._budget(n_valid, layer_idx, n_layers, jnp), 1, jnp.maximum(n_valid, 1))
        return jnp.minimum(b, n_valid)

    def capacity(self, size, n_kv):
        # static: the largest budget any prompt of at most `seg` tokens can get in layer l
        n_layers = len(size.segments)
        segs = tuple(static_budget_max(lambda n, l=l: self._budget(n, l, n_layers, np), seg)
                     for l, seg in enumerate(size.segments))
        return StaticSize(segs, min(size.total, n_kv * sum(segs)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069), as in kvpress.

    SnapKV scoring; layer l keeps `max_num - l * (max_num - min_num) / (L - 1)` tokens with
    `min_num = budget / beta`, so lower layers keep more (the `Pyramid` allocator; its
    budgets are segment sizes in the store, so memory follows them).
    """

    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"{self.beta=} must be >= 1")

    def allocator(self):
        return Pyramid(compression_ratio=self.compression_ratio, window_size=self.window_size,
                       beta=self.beta)
