"""StreamingLLM: attention sinks plus the most recent tokens (arXiv 2309.17453)."""

import dataclasses

import jax.numpy as jnp

from kvjax.presses.base import ScorerPress


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLMPress(ScorerPress):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453).

    Keeps the first `n_sink` tokens (attention sinks) and the most recent ones; no scores
    are needed. As in kvpress, positions are not re-assigned after eviction.
    """

    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"{self.n_sink=} must be >= 0")

    def check_prompt(self, min_prompt_len):
        if min_prompt_len <= self.n_sink:
            raise ValueError(f"prompt length {min_prompt_len} must exceed n_sink={self.n_sink}")

    def score(self, prefix, obs, ctx):
        # Later positions score higher; sinks above everything: top-k = sinks + most recent.
        pos = prefix.pos.astype(jnp.float32)
        return jnp.where(prefix.pos < self.n_sink, jnp.inf, pos)
