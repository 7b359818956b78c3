"""SnapKV: keep the tokens the last W prompt queries attend to (arXiv 2404.14469)."""

import dataclasses

import jax.numpy as jnp

from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress
from kvjax.presses.window import (POOLINGS, check_window_args, in_window, pool1d,
                                  window_attention)

__all__ = ["POOLINGS", "SnapKVPress", "check_window"]


def check_window(press, min_prompt_len: int) -> None:
    if min_prompt_len <= press.window_size:
        raise ValueError(f"prompt length {min_prompt_len} must exceed "
                         f"window_size={press.window_size} of {type(press).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKVPress(ScorerPress):
    """SnapKV (Li et al. 2024, arXiv 2404.14469).

    Scores each prompt token by the mean attention it receives from the last `window_size`
    prompt queries, smoothed by 1-D pooling along tokens (`kernel_size`, avg as in kvpress;
    `pooling="max"` with kernel 7 is the ThinK/PyramidKV papers' setting), averaged over the
    query heads of each kv group. The window itself is always kept. kvpress defaults.

    `question_window=True`: the window is exactly the question's tokens whenever the caller
    knows them (`Pipeline.run(question_aware=True)` passes the span as
    `Observation.question_len`), per sequence; otherwise the last `window_size` tokens.
    """

    score_scale = "attention"

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"
    question_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_window_args(self)

    @property
    def obs_spec(self):
        spec = ObsSpec(window=self.window_size)
        return spec.merge(ObsSpec(question=True)) if self.question_window else spec

    def check_prompt(self, min_prompt_len):
        check_window(self, min_prompt_len)

    @property
    def kept_recent(self) -> int:
        return self.window_size

    def score(self, prefix, obs, ctx):
        if self.question_window and obs.question_len is not None:
            return question_window_scores(prefix, obs, ctx.prompt_len, obs.question_len,
                                          self.kernel_size, self.pooling)
        return snapkv_scores(prefix, obs, ctx.prompt_len, self.window_size, self.kernel_size,
                             self.pooling)


def snapkv_scores(prefix, obs, prompt_len, window, kernel_size, pooling="avg"):
    """[B, K, C] SnapKV scores; window slots get +inf so they are always kept."""
    probs = window_attention(prefix, obs, prompt_len, window)  # [B, K, G, W, C]
    win = in_window(prefix, prompt_len, window)  # [B, K, C]
    s = jnp.where(win[:, :, None], 0.0, probs.mean(axis=3))  # pool over the pre-window region
    s = pool1d(s, kernel_size, pooling).mean(axis=2)
    return jnp.where(win, jnp.inf, s)


def question_window_scores(prefix, obs, prompt_len, question_len, kernel_size, pooling="avg"):
    """[B, K, C] SnapKV scores whose window is each sequence's question: the last
    question_len [B] prompt tokens (clipped to [1, the observed rows]) score the rest by
    their mean attention and are kept (+inf)."""
    w = obs.q_window.shape[1]  # the plan widened the window to the question's bucket
    n = jnp.clip(question_len, 1, jnp.minimum(w, prompt_len)).astype(jnp.int32)  # [B]
    probs = window_attention(prefix, obs, prompt_len, w)  # [B, K, G, W, C]
    rows = jnp.arange(w)[None, :] >= (w - n)[:, None]  # [B, W]: the question's rows
    probs = jnp.where(rows[:, None, None, :, None], probs, 0.0)
    win = prefix.pos >= (prompt_len - n)[:, None, None]  # [B, K, C]
    mean = probs.sum(axis=3) / n[:, None, None, None].astype(jnp.float32)
    s = pool1d(jnp.where(win[:, :, None], 0.0, mean), kernel_size, pooling).mean(axis=2)
    return jnp.where(win, jnp.inf, s)
