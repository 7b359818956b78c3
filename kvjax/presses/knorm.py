"""KNorm: keep the keys with the smallest L2 norm (arXiv 2406.11430)."""

import dataclasses

import jax.numpy as jnp

from kvjax.presses.base import ScorerPress


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnormPress(ScorerPress):
    """KNorm (Devoto et al. 2024, arXiv 2406.11430).

    Low-norm keys correlate with high attention, so the score is -||k||_2 (in f32), per kv
    head; no queries or attention needed.
    """

    def score(self, prefix, obs, ctx):
        return -jnp.linalg.norm(prefix.k.astype(jnp.float32), axis=-1)
