"""TOVA: keep the tokens the last prompt token attends to, averaged over heads
(arXiv 2401.06104)."""

import dataclasses

import jax.numpy as jnp

from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress
from kvjax.presses.window import in_window, window_attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVAPress(ScorerPress):
    """TOVA (Oren et al. 2024, arXiv 2401.06104), one-shot prefill variant as in kvpress.

    Scores are the attention of the last prompt token averaged over all query heads of the
    layer, so every kv head keeps the same tokens; the last token is always kept.
    """

    score_scale = "attention"

    @property
    def obs_spec(self):
        return ObsSpec(window=1)

    def check_prompt(self, min_prompt_len):
        if min_prompt_len < 2:
            raise ValueError(f"prompt length {min_prompt_len} must be >= 2 for TOVAPress")

    def score(self, prefix, obs, ctx):
        probs = window_attention(prefix, obs, ctx.prompt_len, 1)[:, :, :, 0]  # [B, K, G, C]
        s = jnp.broadcast_to(probs.mean(axis=(1, 2))[:, None], prefix.pos.shape)
        # the layer-wide mean is indexed by slot; valid with full-width uncompressed slots
        return jnp.where(in_window(prefix, ctx.prompt_len, 1), jnp.inf, s)
