"""Where a DecodingPress's scores come from while tokens are generated.

Three kinds, chosen from the press a `DecodingPress` wraps (`decode_scores`):
  * `KeyScores`: query-free scorers (KnormPress, StreamingLLMPress, RandomPress,
    KeyDiffPress) score segment and tail slots from their keys at every merge; no state.
  * `HiddenScores`: KVzapPress scores every token once, from its own hidden state: prompt
    tokens at compression (kept in the store's per-slot state), generated tokens as they are
    written (the tail's `score`). Its log scores are on one calibrated scale, so a decode
    threshold (`ScoreThreshold`) means something.
  * `AttentionScores`: from the decode step's own attention probabilities, averaged over
    each kv head's query group. TOVAPress ("last"): the newest query's attention, replaced
    every step (TOVA evicts by it; a merge every step is TOVA exactly). ObservedAttention-
    Press ("sum", H2O): every query's attention summed per slot as the ring decode keeps its
    rows, divided at a merge by the queries that could see the slot (as the prefill score).
    The hook computes attention itself (jnp), to see the probabilities.
Axis letters: B batch, K kv heads, G query heads per kv head, T new tokens, M segment
slots, S tail slots, C candidates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.observation import Observation, ObsSpec
from kvjax.presses.base import ScorerPress
from kvjax.presses.kvzap import KVzapPress
from kvjax.presses.observed_attention import ObservedAttentionPress
from kvjax.presses.tova import TOVAPress
from kvjax.presses.window import window_attention


@dataclasses.dataclass(frozen=True)
class KeyScores:
    """A query-free scorer, run on the candidates at every merge."""

    press: ScorerPress
    stateful = False
    from_hidden = False
    from_attention = False

    def merge_scores(self, both, state, ctx):
        """both: the candidates' view [B, K, C]; state: unused -> scores [B, K, C]."""
        return self.press.score(both, Observation(), ctx)


@dataclasses.dataclass(frozen=True)
class HiddenScores:
    """KVzap's per-token log scores, computed once per token from its hidden state."""

    press: KVzapPress
    stateful = True
    from_hidden = True
    from_attention = False

    def initial(self, full, obs, idx, ctx) -> jax.Array:
        """The kept prompt slots' scores [B, K, M] (idx [B, K, M] into the prompt's slots)."""
        return jnp.take_along_axis(self.press.score(full, obs, ctx), idx, axis=2)

    def new_tokens(self, hidden, positions, layer, n_layers: int, n_kv: int) -> jax.Array:
        """hidden [B, T, D] of tokens at positions [B, T] -> scores [B, K, T]."""
        weights = self.press.weights.resolve(n_layers, hidden.shape[-1], n_kv)
        s = weights.apply(hidden, layer).transpose(0, 2, 1).astype(jnp.float32)
        return jnp.where(positions[:, None, :] < self.press.n_sink, jnp.inf, s)

    def merge_scores(self, both, state, ctx):
        return state


@dataclasses.dataclass(frozen=True)
class AttentionScores:
    """Scores from the decode step's attention: "last" (TOVA) or "sum" (H2O)."""

    press: ScorerPress
    mode: str
    stateful = True
    from_hidden = False
    from_attention = True

    def initial(self, full, obs, idx, ctx) -> jax.Array:
        """The prefill's scores at the kept slots idx [B, K, M] -> [B, K, M]: the last prompt
        query's attention (TOVA), or the attention every prompt query gave (H2O sums)."""
        if self.mode == "last":
            per_slot = window_attention(full, obs, ctx.prompt_len, 1)[:, :, :, 0].mean(axis=2)
        else:
            b, n, t = obs.column_sums.shape
            per_slot = obs.column_sums.reshape(b, full.k.shape[1], -1, t).mean(axis=2)
        return jnp.take_along_axis(per_slot, idx, axis=2)

    def update(self, state: jax.Array, probs: jax.Array, real: jax.Array) -> jax.Array:
        """state [B, K, C] per slot, probs [B, K, G, T, C] of the step's queries, real [B, T]
        (queries past n_new are padding) -> the new state."""
        seen = jnp.where(real[:, None, None, :, None], probs, 0.0).mean(axis=2)  # [B, K, T, C]
        if self.mode == "sum":
            return state + seen.sum(axis=2)
        n = jnp.sum(real, axis=1)  # the newest real query replaces the state
        last = jnp.take_along_axis(seen, jnp.maximum(n - 1, 0)[:, None, None, None], axis=2)
        return jnp.where((n > 0)[:, None, None], last[:, :, 0], state)

    def merge_scores(self, both, state, ctx):
        if self.mode == "last":
            return state
        seen_by = (ctx.prompt_len[:, None, None] - both.pos).astype(jnp.float32)
        return state / jnp.maximum(seen_by, 1.0)


def decode_scores(press) -> KeyScores | HiddenScores | AttentionScores:
    """The score source of a DecodingPress over `press`; ValueError naming a press it cannot
    score with while decoding."""
    if not isinstance(press, ScorerPress):
        raise ValueError(f"DecodingPress needs a ScorerPress, got {type(press).__name__}")
    if isinstance(press, KVzapPress):
        return HiddenScores(press)
    if isinstance(press, TOVAPress):
        return AttentionScores(press, "last")
    if isinstance(press, ObservedAttentionPress):
        return AttentionScores(press, "sum")
    if press.obs_spec != ObsSpec():
        raise ValueError(f"{type(press).__name__} needs prefill observations that decoding "
                         "does not make; a DecodingPress takes a query-free scorer (knorm, "
                         "streaming_llm, random, keydiff), a hidden-state scorer (kvzap) or "
                         "an attention scorer (tova, observed_attention)")
    return KeyScores(press)
