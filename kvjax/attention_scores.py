"""Pure-jnp reference for prefill attention that also emits score statistics.

This is the specification of `pallas_kernels.{tpu,gpu}.prefill_attention_with_scores`: causal
attention over a right-padded prompt plus, per query head, the column sums of the attention
probabilities over a chosen set of query rows:

  * ``"all"``: every valid row (H2O / ObservedAttention);
  * ``("window", W)``: the last W valid rows of each sequence (SnapKV family);
  * an int array ``[B, P]``: given proxy rows (NACL); entries < 0 or >= length are ignored.

The probabilities are those of the attention itself (causal, sliding window, ragged lengths),
so ``colsums[b, n].sum()`` equals the number of selected valid rows. Everything is chunked over
rows and keys: memory is O(row_chunk * key_chunk) per head, never T x T. Axis letters: B batch,
T prompt positions, N q heads, K kv heads, G = N // K, H head dim, P selected rows.
"""

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale, prefill_attention_reference
from pallas_kernels._prefill_common import score_row_positions  # shared with the kernels

_CHUNK = 512


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _masked_logits(qr, rpos, kc, kpos, lengths, scale, sliding_window):
    """qr [B, Pc, K, G, H], rpos [B, Pc], kc [B, Sc, K, H], kpos [Sc] -> [B, K, G, Pc, Sc]."""
    logits = jnp.einsum("bpkgh,bskh->bkgps", qr, kc, preferred_element_type=jnp.float32)
    ok = (kpos[None, None, :] <= rpos[:, :, None]) & (kpos[None, None, :] < lengths[:, None, None])
    if sliding_window is not None:
        ok &= rpos[:, :, None] - kpos[None, None, :] < sliding_window
    return jnp.where(ok[:, None, None], logits * scale, -jnp.inf)


def column_sums_reference(q: jax.Array, k: jax.Array, lengths: jax.Array, rows: jax.Array,
                          row_valid: jax.Array, *, scale: float | None = None,
                          sliding_window: int | None = None, chunk: int = _CHUNK) -> jax.Array:
    """Column sums of causal attention probabilities over the selected rows.

    Args:
      q: [B, T, N, H] post-RoPE queries; k: [B, T, K, H] keys; lengths: [B].
      rows: [B, P] row positions; row_valid: [B, P] which of them count.
      scale: logit scale, default 1/sqrt(H); sliding_window: Mistral-style window.
      chunk: row and key chunk size (memory is O(chunk^2) per head).

    Returns:
      [B, N, T] f32; entry s is sum over valid selected rows r of softmax_r(s).
    """
    b, t, n, h = q.shape
    n_kv = k.shape[2]
    scale = default_scale(h) if scale is None else scale
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [B, P, N, H]
    p = rows.shape[1]
    pc, sc = min(chunk, p), min(chunk, t)
    qr = _pad_to(qr, 1, pc).reshape(b, -1, n_kv, n // n_kv, h)
    rpos, rvalid = _pad_to(rows, 1, pc), _pad_to(row_valid, 1, pc)
    kp = _pad_to(k, 1, sc)
    n_rc, n_kc = qr.shape[1] // pc, kp.shape[1] // sc

    def logits(i, j):
        q_c = jax.lax.dynamic_slice_in_dim(qr, i * pc, pc, axis=1)
        r_c = jax.lax.dynamic_slice_in_dim(rpos, i * pc, pc, axis=1)
        k_c = jax.lax.dynamic_slice_in_dim(kp, j * sc, sc, axis=1)
        return _masked_logits(q_c, r_c, k_c, j * sc + jnp.arange(sc), lengths, scale,
                              sliding_window)

    def row_lse(i):  # online log-sum-exp over key chunks -> [B, K, G, Pc]
        def step(carry, j):
            m, s = carry
            lg = logits(i, j)
            m_new = jnp.maximum(m, jnp.max(lg, -1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(lg - m_safe[..., None]), -1)
            return (m_new, s), None
        init = (jnp.full((b, n_kv, n // n_kv, pc), -jnp.inf), jnp.zeros((b, n_kv, n // n_kv, pc)))
        (m, s), _ = jax.lax.scan(step, init, jnp.arange(n_kc))
        return m + jnp.log(s)

    lse = jax.lax.map(row_lse, jnp.arange(n_rc))  # [n_rc, B, K, G, Pc]
    ok = rvalid.reshape(b, n_rc, pc).transpose(1, 0, 2)[:, :, None, None, :] & jnp.isfinite(lse)
    lse = jnp.where(ok, lse, jnp.inf)  # invalid rows contribute exp(-inf) = 0

    def key_chunk(j):
        def step(acc, i):
            pr = jnp.exp(logits(i, j) - lse[i][..., None])
            return acc + jnp.sum(pr, axis=3), None
        acc, _ = jax.lax.scan(step, jnp.zeros((b, n_kv, n // n_kv, sc)), jnp.arange(n_rc))
        return acc

    cols = jax.lax.map(key_chunk, jnp.arange(n_kc))  # [n_kc, B, K, G, Sc]
    cols = jnp.moveaxis(cols, 0, 3).reshape(b, n, n_kc * sc)[..., :t]
    return cols


def prefill_attention_with_scores_reference(
        q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
        scale: float | None = None, sliding_window: int | None = None,
        score_rows="all") -> tuple[jax.Array, jax.Array]:
    """Causal prefill attention plus column sums of its probabilities over selected rows.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H]; lengths: [B] valid lengths.
      scale: logit scale, default 1/sqrt(H).
      sliding_window: keys more than `sliding_window - 1` positions back are masked.
      score_rows: "all" | ("window", W) | int array [B, P] of proxy row indices, or None
        (attention only).

    Returns:
      out [B, T, N, H] in q's dtype (as `prefill_attention_reference`) and colsums [B, N, T] f32
      (None when score_rows is None).
    """
    out = prefill_attention_reference(q, k, v, lengths, scale=scale,
                                      sliding_window=sliding_window)
    if score_rows is None:
        return out, None
    rows, valid = score_row_positions(score_rows, lengths, q.shape[1])
    cols = column_sums_reference(q, k, lengths, rows, valid, scale=scale,
                                 sliding_window=sliding_window)
    return out, cols
