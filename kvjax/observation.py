"""What a layer hands the compressor after prefill (docs/architecture.md section 2).

Keys and values are the layer's uncompressed prefix itself; the observation adds what only
the prefill can see cheaply: post-RoPE queries of the last W prompt positions of every
sequence and, for presses that ask for them, column sums of the causal attention.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    """Static description of what presses need observed.

    Attributes:
      window: W, number of last prompt positions whose queries are kept (0 = none).
      column_sums: whether the prefill attention also returns column sums of its causal
        probabilities over all valid query rows (H2O / ObservedAttention; `kvjax.prefill_layer`
        asks `kvjax.dispatch.prefill_attention_with_scores` for them).
      proxy_ratio: NACL proxy rows: widen the window to ceil(proxy_ratio * T) rows, T the
        padded prompt length (a static bound on every sequence's own proxy count).
      hidden: keep every token's attention input (the layer's normed hidden state; KVzap).
      question: the press reads the question's span (`Observation.question_len`) when the
        caller knows it (`Pipeline.run(question_aware=True)`); the plan then widens `window`
        to hold the question's rows.
    """

    window: int = 0
    column_sums: bool = False
    query_stats: bool = False
    query_stats_skip: int = 0
    proxy_ratio: float = 0.0
    hidden: bool = False
    question: bool = False

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"{self.window=} must be >= 0")
        if self.query_stats_skip < 0:
            raise ValueError(f"{self.query_stats_skip=} must be >= 0")
        if not 0.0 <= self.proxy_ratio <= 1.0:
            raise ValueError(f"{self.proxy_ratio=} must be in [0, 1]")

    def merge(self, other: "ObsSpec") -> "ObsSpec":
        return ObsSpec(window=max(self.window, other.window),
                       column_sums=self.column_sums or other.column_sums,
                       query_stats=self.query_stats or other.query_stats,
                       query_stats_skip=max(self.query_stats_skip, other.query_stats_skip),
                       proxy_ratio=max(self.proxy_ratio, other.proxy_ratio),
                       hidden=self.hidden or other.hidden,
                       question=self.question or other.question)

    def window_for(self, t: int) -> int:
        """Rows of `q_window` observed for a padded prompt of `t` positions (static)."""
        if self.proxy_ratio > 0:
            return max(self.window, math.ceil(self.proxy_ratio * t), 1)
        return self.window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Per-layer prefill statistics.

    Attributes:
      q_window: [B, W, N, H] post-RoPE queries of positions length-W .. length-1, or None.
      window_valid: [B, W] False where length - W + w < 0 (prompt shorter than W).
      column_sums: [B, N, T] sum over query rows of causal attention probabilities, or None.
      q_mean: [B, N, H] mean of pre-RoPE queries over positions [skip, length), or None.
      q_cov: [B, N, H, H] their covariance (divided by the count), or None.
      rope_inv_freq: [H/2] the layer's rotary inverse frequencies, or None.
      token_scores: [B, K, T] f32 scores a prompt observer computed after the prefill (KVzip's
        repeat pass, `kvjax.kvzip`), or None.
      hidden: [B, T, D] the layer's attention input for every prompt token, or None.
      question_len: [B] int32 tokens at the end of each prompt that are the question (known
        to `Pipeline.run(question_aware=True)`), or None.
      rope_interleaved: the rotary pairs are (2i, 2i+1) (GPT-J) rather than (i, i + H/2)
        (Llama's rotate-half); static.
    """

    q_window: jax.Array | None = None
    window_valid: jax.Array | None = None
    column_sums: jax.Array | None = None
    q_mean: jax.Array | None = None
    q_cov: jax.Array | None = None
    rope_inv_freq: jax.Array | None = None
    token_scores: jax.Array | None = None
    hidden: jax.Array | None = None
    question_len: jax.Array | None = None
    rope_interleaved: bool = dataclasses.field(metadata=dict(static=True), default=False)


def gather_window(q: jax.Array, lengths: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Queries of the last `window` valid positions of each right-padded sequence.

    Args:
      q: [B, T, N, H]; lengths: [B].

    Returns:
      q_window [B, W, N, H] and window_valid [B, W].
    """
    idx = lengths[:, None] - window + jnp.arange(window)[None, :]  # [B, W]
    valid = idx >= 0
    idx = jnp.clip(idx, 0, q.shape[1] - 1)
    return jnp.take_along_axis(q, idx[:, :, None, None], axis=1), valid


def query_statistics(q: jax.Array, lengths: jax.Array, skip: int) -> tuple[jax.Array, jax.Array]:
    """Mean [B, N, H] and covariance [B, N, H, H] of q [B, T, N, H] over positions
    [skip, length) of each sequence (f32)."""
    pos = jnp.arange(q.shape[1])
    w = ((pos[None, :] >= skip) & (pos[None, :] < lengths[:, None])).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None, None]  # [B, 1, 1]
    q = q.astype(jnp.float32)
    mean = jnp.einsum("bt,btnh->bnh", w, q) / count
    centered = (q - mean[:, None]) * w[:, :, None, None]
    cov = jnp.einsum("btni,btnj->bnij", centered, centered) / count[..., None]
    return mean, cov


def observe(q: jax.Array, lengths: jax.Array, spec: ObsSpec, *,
            q_prerope: jax.Array | None = None, rope_inv_freq=None,
            rope_interleaved: bool = False, column_sums: jax.Array | None = None,
            hidden: jax.Array | None = None) -> Observation:
    """Build the Observation that `spec` asks for from one layer's prefill q [B, T, N, H].

    `column_sums` [B, N, T] are the column sums the prefill attention returned
    (`kvjax.dispatch.prefill_attention_with_scores`); `spec.column_sums` requires them.
    """
    q_window = window_valid = q_mean = q_cov = None
    window = spec.window_for(q.shape[1])
    if window:
        q_window, window_valid = gather_window(q, lengths, window)
    if not spec.column_sums:
        column_sums = None
    elif column_sums is None:
        raise ValueError("spec.column_sums=True needs the attention's column sums: pass "
                         "column_sums= from kvjax.dispatch.prefill_attention_with_scores")
    if spec.query_stats:
        if q_prerope is None or rope_inv_freq is None:
            raise ValueError("this press needs pre-RoPE queries and the RoPE frequencies: pass "
                             "q_prerope= and rope_inv_freq= to kvjax.prefill_layer")
        q_mean, q_cov = query_statistics(q_prerope, lengths, spec.query_stats_skip)
    if spec.hidden and hidden is None:
        raise ValueError("this press needs the layer's attention input: pass hidden= to "
                         "kvjax.prefill_layer")
    inv_freq = None if rope_inv_freq is None else jnp.asarray(rope_inv_freq, jnp.float32)
    return Observation(q_window=q_window, window_valid=window_valid, column_sums=column_sums,
                       q_mean=q_mean, q_cov=q_cov, rope_inv_freq=inv_freq,
                       rope_interleaved=rope_interleaved,
                       hidden=hidden if spec.hidden else None)
