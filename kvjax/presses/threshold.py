"""ThresholdPress: keep every entry whose score reaches a threshold, so the budget follows
the input (kvpress's `ThresholdPress(KVzapPress(...), threshold=-4)`).

A threshold means something only on scores with a known scale (`ScorerPress.score_scale`):
  "log": KVzap's scores are predictions of log KVzip scores, calibrated across layers and
    inputs: an entry is kept when its score >= `threshold` (e.g. -4);
  "attention": SnapKV, PyramidKV's scorer, TOVA and ObservedAttention score by attention
    received, whose scale changes with the prompt length: each (layer, kv head) keeps its
    smallest set of best entries that holds `threshold` (in (0, 1]) of the head's score mass.
Other scorers (key norms, random, StreamingLLM, ...) have no such scale and are refused.
Entries a scorer protects (+inf: SnapKV's window, KVzap's sinks) are always kept.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.presses.base import ScorerPress, WrapperPress
from kvjax.presses.decode_budget import ScoreThreshold
from kvjax.presses.decoding import DecodingPress
from kvjax.presses.parts import Allocator, Stage, check_fields

SCALES = ("log", "attention")


@dataclasses.dataclass(frozen=True)
class Threshold(Allocator):
    """Budgets [B, L, K] counted from the scores: entries >= `threshold` ("log"), or the
    fewest best entries holding `threshold` of the head's finite score mass ("attention"),
    plus the protected (+inf) entries. The static bound is the whole prompt."""

    threshold: float
    scale: str

    def layer_stat(self, view, obs, scores, ctx):
        """[B, K] kept counts from scores [B, K, C] (-inf invalid, +inf protected)."""
        protected = jnp.sum(scores == jnp.inf, axis=-1)
        if self.scale == "log":
            return jnp.sum(scores >= self.threshold, axis=-1).astype(jnp.int32)
        finite = jnp.isfinite(scores)
        s = jnp.where(finite, jnp.maximum(scores, 0.0), 0.0)
        ranked = -jnp.sort(-s, axis=-1)  # descending
        cum = jnp.cumsum(ranked, axis=-1)
        total = cum[..., -1:]
        need = jnp.sum(cum < self.threshold * total, axis=-1) + 1  # the entry that reaches it
        need = jnp.minimum(need, jnp.sum(finite, axis=-1))
        return (need + protected).astype(jnp.int32)

    def budgets(self, n_valid, stats, prompt_len):
        return jnp.minimum(stats.transpose(1, 0, 2), n_valid)  # [L, B, K] -> [B, L, K]

    def capacity(self, size, n_kv):
        return size  # a threshold may keep every entry


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThresholdPress(WrapperPress):
    """Keep what `press` scores at or above `threshold` in every layer and kv head.

    Budgets are data and so is the threshold (a `value_fields` entry, traced by jit: neither a
    new input nor a new threshold recompiles), bounded by the prompt:
    the store `kvjax.compress` writes is sized for the whole prompt (its bytes are the bound),
    while the serving engine's pool (`kvjax.Engine`) and `memory_report(...).prefix_tokens`
    hold and count only the kept entries; `achieved_ratio(cache, prompt_lengths)` reports the
    ratio reached per request. A `WrapperPress`: the stage is `press`'s with `Threshold` as
    its allocator; every other member forwards to `press`.

    Attributes:
      press: a ScorerPress whose `score_scale` is "log" or "attention" (its own
        compression_ratio must stay 0: the threshold sets the budget).
      threshold: the score to reach ("log"), or the share of attention mass to keep in (0, 1]
        ("attention").
      decoding: also while generating (kvpress's `decoding=True`; "log" scorers only): the
        press brings a `DecodingPress(press, compression_interval, ScoreThreshold(threshold))`
        as its decode hook, so every `compression_interval` generated tokens each (layer, kv
        head) keeps the prompt and generated entries scoring >= `threshold`.
      compression_interval: generated tokens between decode-time merges (with `decoding`).
      sliding_window_size: the most recent tokens every decode-time merge keeps whatever
        their score (with `decoding`; kvpress's DMSPress uses 128).
    """

    press: ScorerPress
    threshold: float
    compression_ratio: float = 0.0  # unknown before the input: the static bound keeps all
    decoding: bool = False
    compression_interval: int = 64
    sliding_window_size: int = 0
    value_fields = ("threshold",)  # traced by jit: a new threshold never recompiles

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"ThresholdPress needs a ScorerPress to score entries, got "
                             f"{type(self.press).__name__}")
        scale = self.press.score_scale
        if scale not in SCALES:
            raise ValueError(
                f"{type(self.press).__name__} scores have no calibrated scale, so a threshold "
                "on them means nothing: use KVzapPress (log scores, e.g. threshold=-4) or an "
                "attention scorer (SnapKVPress, TOVAPress, ObservedAttentionPress: threshold "
                "= the share of attention mass to keep, in (0, 1])")
        if scale == "attention" and not 0 < self.threshold <= 1:
            raise ValueError(f"{self.threshold=}: for {type(self.press).__name__}'s attention "
                             "scores the threshold is the share of attention mass kept, in "
                             "(0, 1]")
        if self.press.compression_ratio != 0:
            raise ValueError(f"{type(self.press).__name__}(compression_ratio="
                             f"{self.press.compression_ratio}): the threshold sets the budget; "
                             "leave the scorer's compression_ratio at 0")
        if self.compression_ratio != 0:
            raise ValueError(f"ThresholdPress(compression_ratio={self.compression_ratio}): the "
                             "ratio follows the input; see kvjax.achieved_ratio")
        object.__setattr__(self, "threshold", float(self.threshold))  # one dtype when traced
        if self.decoding and scale != "log":
            raise ValueError(f"ThresholdPress(decoding=True) over {type(self.press).__name__}: "
                             "a decode-time threshold needs log scores that mean the same at "
                             "every step (KVzapPress); attention-mass thresholds are per prompt")
        super().__post_init__()
        if self.decoding:
            self.decode_hook.check_press(self)  # the interval, the scorer's decode form

    @property
    def decode_hook(self):
        """With `decoding`: the decode-time threshold (`kvjax.DecodingPress`), else the inner
        press's hook (None for every scorer a threshold takes)."""
        if not self.decoding:
            return super().decode_hook
        return DecodingPress(press=self.press, compression_interval=self.compression_interval,
                             budget=ScoreThreshold(self.threshold),
                             window_size=self.sliding_window_size)

    def stages(self):
        return (Stage(scorer=self.press,
                      allocator=Threshold(self.threshold, self.press.score_scale),
                      selector=self.press.selector()),)
