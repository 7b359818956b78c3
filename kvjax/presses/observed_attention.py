"""ObservedAttention: H2O-style mean attention received during prefill (arXiv 2306.14048)."""

import dataclasses

import jax.numpy as jnp

from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObservedAttentionPress(ScorerPress):
    """Heavy hitters, prefill variant (Zhang et al. 2023, H2O, arXiv 2306.14048).

    Score = column sum of the causal attention over all prompt queries divided by the number
    of queries that can see the key (T - t, removing the bias toward early tokens), averaged
    over the query heads of each kv group (kvpress's ObservedAttentionPress). The column sums
    are computed in key chunks during prefill; the T x T matrix is never materialised.
    """

    score_scale = "attention"

    @property
    def obs_spec(self):
        return ObsSpec(column_sums=True)

    def score(self, prefix, obs, ctx):
        b, n, t = obs.column_sums.shape
        n_kv = prefix.k.shape[1]
        cols = obs.column_sums.reshape(b, n_kv, n // n_kv, t)
        seen_by = (ctx.prompt_len[:, None, None, None] - jnp.arange(t)).astype(jnp.float32)
        mean = (cols / jnp.maximum(seen_by, 1.0)).mean(axis=2)  # [B, K, T]
        return jnp.take_along_axis(mean, prefix.pos, axis=2)
