"""Proxy-token attention scores for NACL (arXiv 2408.03675), jnp reference.

The attention a few proxy queries pay to every key, summed over the proxy rows, in two passes
over key chunks (row log-sum-exp, then column sums of exp(logit - lse)), so memory is
O(P * chunk) per head and the P x C block is never held whole for long prompts. This is the
specification of the score-emitting prefill kernel (docs/kernels.md, score kernel).
Axis letters: B batch, P proxy rows, N q heads, K kv heads, G = N // K, H head dim, C slots.
"""

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale

DEFAULT_CHUNK = 512


def proxy_scores_reference(q: jax.Array, q_pos: jax.Array, row_valid: jax.Array, k: jax.Array,
                           k_pos: jax.Array, k_len: jax.Array, *, causal: bool = True,
                           scale: float | None = None,
                           chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Sum over proxy rows of each row's softmax attention probabilities, per query head.

    Args:
      q: [B, P, N, H] post-RoPE proxy queries; q_pos: [B, P] their positions;
        row_valid: [B, P] False for rows that are not proxies of their sequence.
      k: [B, K, C, H] post-RoPE keys; k_pos: [B, K, C] their positions; k_len: [B, K] valid
        slots per kv head (slots >= k_len are padding).
      causal: a row at position p sees slots with position <= p; False: every valid slot
        (the official NACL call).
      scale: logit scale, default 1/sqrt(H).
      chunk: key-chunk size of both passes.

    Returns:
      [B, N, C] f32: s[b, n, c] = sum over valid rows i of softmax_c(q_i . k_c * scale);
      zero on padding slots and for rows that see no slot.
    """
    b, p, n, h = q.shape
    n_kv, c = k.shape[1], k.shape[2]
    g = n // n_kv
    scale = default_scale(h) if scale is None else scale
    chunk = max(1, min(chunk, c))
    n_chunks = -(-c // chunk)
    pad = n_chunks * chunk - c
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    posp = jnp.pad(k_pos, ((0, 0), (0, 0), (0, pad)))
    qg = q.reshape(b, p, n_kv, g, h)

    def block_logits(i):  # -> [B, K, G, P, Sc], -inf where a row may not see a slot
        kb = jax.lax.dynamic_slice_in_dim(kp, i * chunk, chunk, axis=2)  # [B, K, Sc, H]
        pb = jax.lax.dynamic_slice_in_dim(posp, i * chunk, chunk, axis=2)  # [B, K, Sc]
        slot = i * chunk + jnp.arange(chunk)
        ok = (slot[None, None, :] < k_len[..., None])[:, :, None, :]  # [B, K, 1, Sc]
        if causal:
            ok = ok & (pb[:, :, None, :] <= q_pos[:, None, :, None])  # [B, K, P, Sc]
        ok = ok & row_valid[:, None, :, None]
        logits = jnp.einsum("bpkgh,bksh->bkgps", qg, kb,
                            preferred_element_type=jnp.float32) * scale
        return jnp.where(ok[:, :, None], logits, -jnp.inf)

    def lse_step(carry, i):  # online log-sum-exp over key chunks
        m, s = carry
        lg = block_logits(i)
        m_new = jnp.maximum(m, jnp.max(lg, -1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        s = s * jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
        return (m_new, s + jnp.sum(jnp.exp(lg - safe[..., None]), -1)), None

    init = (jnp.full((b, n_kv, g, p), -jnp.inf), jnp.zeros((b, n_kv, g, p)))
    (m, s), _ = jax.lax.scan(lse_step, init, jnp.arange(n_chunks))
    # Rows that see nothing get lse = +inf, so exp(-inf - inf) = 0 and they add nothing.
    lse = jnp.where(s > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s), jnp.inf)

    def col_block(i):
        return jnp.sum(jnp.exp(block_logits(i) - lse[..., None]), axis=3)  # [B, K, G, Sc]

    cols = jax.lax.map(col_block, jnp.arange(n_chunks))  # [n_chunks, B, K, G, Sc]
    cols = jnp.moveaxis(cols, 0, 3).reshape(b, n_kv, g, n_chunks * chunk)[..., :c]
    return cols.reshape(b, n, c)
