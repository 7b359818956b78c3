"""Random eviction: a baseline with an explicit seed."""

import dataclasses

import jax

from kvjax.presses.base import ScorerPress


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomPress(ScorerPress):
    """Keeps a uniformly random subset of tokens per kv head (baseline).

    Deterministic given `seed`: layer l draws from `fold_in(key(seed), l)`.
    """

    seed: int = 0

    def score(self, prefix, obs, ctx):
        key = jax.random.fold_in(jax.random.key(self.seed), ctx.layer_idx)
        return jax.random.uniform(key, prefix.pos.shape)
