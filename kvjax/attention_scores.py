"""Pure-jnp reference for causal prefill attention and its column sums.

This is the specification of `pallas_kernels.{tpu,gpu}.prefill_attention_with_scores`: causal
attention over a right-padded prompt plus, per query head, the column sums of the attention
probabilities over the query rows a `ScoreRows` selects (`pallas_kernels._prefill_common`):

  * ``AllRows()``: every valid row (H2O / ObservedAttention);
  * ``LastRows(W)``: the last W valid rows of each sequence (SnapKV family);
  * ``ProxyRows(rows [B, P])``: given proxy rows (NACL); entries < 0 or >= length are
    ignored, a row listed twice counts twice.

One pass: queries are processed in static chunks (`causal_chunks`), each against only the
keys that causality and the sliding window let it see, so about half the T x T work is
skipped and the T x T matrix is never held whole. The chunk's probabilities give its outputs
and, weighted per row (`score_row_weights`), its share of the column sums, so
``colsums[b, n].sum()`` equals the number of selected valid rows. Softmax and accumulation
are in f32. Axis letters: B batch, T prompt positions, N q heads, K kv heads, G = N // K,
H head dim, S keys of a chunk, P selected rows.
"""

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale, group_heads, masked_softmax, window_ok
from pallas_kernels._prefill_common import (AllRows, ScoreRows, check_score_rows,
                                            score_row_positions)  # shared with the kernels

_Q_CHUNK = 256


def prefill_chunk(t: int) -> int:
    """Static query-chunk size: 256, grown so that a prompt has at most 16 chunks to unroll."""
    return max(_Q_CHUNK, -(-t // (16 * _Q_CHUNK)) * _Q_CHUNK)


def causal_chunks(q: jax.Array, k: jax.Array, lengths: jax.Array, *, scale: float | None,
                  sliding_window: int | None):
    """Yield (start, stop, lo, p) per static query chunk [start, stop): p [B, K, G, Tc, S] f32
    are the masked softmax probabilities over the keys [lo, stop) the chunk may see."""
    b, t, n, h = q.shape
    n_kv = k.shape[2]
    scale = default_scale(h) if scale is None else scale
    qg = group_heads(q, n_kv).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    chunk = prefill_chunk(t)
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        lo = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        q_pos, key_pos = jnp.arange(start, stop), jnp.arange(lo, stop)
        logits = jnp.einsum("bkgqh,bksh->bkgqs", qg[:, :, :, start:stop], kt[:, :, lo:stop],
                            preferred_element_type=jnp.float32)
        causal = (key_pos[None, :] <= q_pos[:, None]) & window_ok(
            q_pos[:, None], key_pos[None, :], sliding_window)  # [Tc, S]
        valid = key_pos[None, :] < lengths[:, None]  # [B, S]
        yield start, stop, lo, masked_softmax(
            logits * scale, causal[None, None, None] & valid[:, None, None, None])


def score_row_weights(score_rows: ScoreRows, lengths: jax.Array, t: int) -> jax.Array:
    """[B, T] f32: how many times each query row is selected (0 for rows outside [0, length)).

    Derived from `score_row_positions`, which the kernels use too: AllRows gives 1 on the
    valid rows, LastRows(W) 1 on the last W valid rows, ProxyRows the count of each row's
    valid entries.
    """
    if isinstance(score_rows, AllRows):
        return (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
    rows, valid = score_row_positions(score_rows, lengths, t)
    b = lengths.shape[0]
    return jnp.zeros((b, t), jnp.float32).at[jnp.arange(b)[:, None], rows].add(
        valid.astype(jnp.float32))


def prefill_attention_with_scores_reference(
        q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
        scale: float | None = None, sliding_window: int | None = None,
        score_rows: ScoreRows | None = AllRows()) -> tuple[jax.Array, jax.Array | None]:
    """Causal prefill attention plus column sums of its probabilities over selected rows.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H]; lengths: [B] valid lengths
        (keys at index >= length are masked).
      scale: logit scale, default 1/sqrt(H).
      sliding_window: keys more than `sliding_window - 1` positions back are masked (Mistral).
      score_rows: AllRows() | LastRows(W) | ProxyRows(rows [B, P]), or None (attention only).

    Returns:
      out [B, T, N, H] in q's dtype (rows of padding queries are garbage-free but
      meaningless) and colsums [B, N, T] f32, entry s the sum over selected valid rows r of
      softmax_r(s) (None when score_rows is None).
    """
    score_rows = check_score_rows(score_rows)
    b, t, n, h = q.shape
    n_kv = k.shape[2]
    weights = None if score_rows is None else score_row_weights(score_rows, lengths, t)
    vt = v.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, K, S, H]
    outs, cols = [], None if weights is None else jnp.zeros((b, n_kv, n // n_kv, t), jnp.float32)
    for start, stop, lo, p in causal_chunks(q, k, lengths, scale=scale,
                                            sliding_window=sliding_window):
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", p, vt[:, :, lo:stop]))
        if weights is not None:
            w = weights[:, None, None, start:stop, None]  # [B, 1, 1, Tc, 1]
            cols = cols.at[..., lo:stop].add(jnp.sum(p * w, axis=3))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    return out, None if cols is None else cols.reshape(b, n, t)


def prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                                *, scale: float | None = None,
                                sliding_window: int | None = None) -> jax.Array:
    """Causal attention over a right-padded prompt: q [B, T, N, H], k, v [B, T, K, H],
    lengths [B] -> [B, T, N, H] in q's dtype (`prefill_attention_with_scores_reference`
    without column sums)."""
    return prefill_attention_with_scores_reference(q, k, v, lengths, scale=scale,
                                                   sliding_window=sliding_window,
                                                   score_rows=None)[0]
