"""Attention over the store read in place, in jnp: what decode runs without a Pallas kernel.

`cached_attention_reference` (the spec) reads a dense `[B, K, max_segment]` view of a layer's
segments. With per-input budgets (ZigZagKV, AdaKV) `max_segment` can be far above the
average segment, so reading it every step would cost as much as the full cache. Here each
layer walks its segments block by block, with an online softmax, for as many blocks as its
longest segment needs (a traced trip count): the bytes read follow the kept entries, as in
the kernels. Tested equal to the spec; axis letters as in `kvjax.attention`.
"""

import jax
import jax.numpy as jnp

from kvjax.attention import (default_scale, gather_query_channels, group_heads,
                             scatter_channels, tail_mask)
from kvjax.cache import KVStore, Tail, gather_kv, gather_rows, slot_index

BLOCK = 128


def _softmax_parts(logits: jax.Array, valid: jax.Array):
    """Masked logits [..., S] -> (max [...], sum of exp [...], probs unnormalised [..., S])."""
    s = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(s - m_safe[..., None]), 0.0)
    return m, jnp.sum(e, axis=-1), e


def segment_partial(qg: jax.Array, q_pos: jax.Array, store: KVStore, layer, carry, *,
                    scale: float, sliding_window: int | None, block: int = BLOCK):
    """Fold layer `layer`'s segments into an online-softmax state, block by block.

    Args:
      qg: [B, T, K, G, Dk] queries on the kept key channels; q_pos: [B, T].
      carry: (m, l [B, K, G, T], acc_prefix [B, K, G, T, Dv], acc_other [..., D]): the state
        so far (e.g. the tail's); acc_other is only rescaled.

    Returns:
      the updated carry.
    """
    n_blocks = -(-jnp.max(store.length[:, layer]) // block)

    def body(i, carry):
        m_prev, l_prev, acc, other = carry
        idx, ok = slot_index(store, layer, block, start=i * block)  # [B, K, blk]
        kb, vb = gather_kv(store, idx)  # dequantized when the store is quantized
        valid = ok[:, :, None, None, :]
        if sliding_window is not None:
            pb = gather_rows(store.pos, idx)
            valid = valid & (q_pos[:, None, None, :, None] - pb[:, :, None, None, :]
                             < sliding_window)
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, kb.astype(qg.dtype),
                            preferred_element_type=jnp.float32) * scale
        m, l, e = _softmax_parts(logits, valid)
        m_new = jnp.maximum(m_prev, m)
        w_old, w_new = _weight(m_prev, m_new), _weight(m, m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", e, vb.astype(jnp.float32))
        return (m_new, l_prev * w_old + l * w_new, acc * w_old[..., None] + pv * w_new[..., None],
                other * w_old[..., None])

    return jax.lax.fori_loop(0, n_blocks, body, carry)


def _weight(m, m_new):
    """exp(m - m_new), 0 where m is -inf (nothing seen yet)."""
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    return jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)


def store_attention(q: jax.Array, q_pos: jax.Array, store: KVStore, layer, tail: Tail, *,
                    scale: float | None = None, sliding_window: int | None = None,
                    block: int = BLOCK) -> jax.Array:
    """`cached_attention_reference(q, q_pos, layer_view(store, layer), tail)`, reading only
    the blocks that hold kept entries.

    Args:
      q: [B, T, N, H] post-RoPE queries; q_pos: [B, T]; store: the store; layer: the layer
        (a traced index inside a scan); tail: the layer's tail (new tokens already in it).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    scale = default_scale(h) if scale is None else scale
    qg = group_heads(q, store.n_kv_heads)
    channels = None if store.channels is None else store.channels[:, layer]
    q_pref = qg if channels is None else gather_query_channels(qg, channels)
    # the tail first, then the prefix blocks folded into the same online softmax
    lt = jnp.einsum("btkgh,bksh->bkgts", qg, tail.k.astype(qg.dtype),
                    preferred_element_type=jnp.float32) * scale
    m, l, e = _softmax_parts(lt, tail_mask(q_pos, tail, sliding_window))
    acc_tail = jnp.einsum("bkgts,bksd->bkgtd", e, tail.v.astype(jnp.float32))
    acc_prefix = jnp.zeros(m.shape + (store.v.shape[-1],), jnp.float32)
    _, l, acc_prefix, acc_tail = segment_partial(
        q_pref, q_pos, store, layer, (m, l, acc_prefix, acc_tail), scale=scale,
        sliding_window=sliding_window, block=block)
    if store.value_channels is not None:
        acc_prefix = scatter_channels(acc_prefix.transpose(0, 3, 1, 2, 4),
                                      store.value_channels[:, layer], h).transpose(0, 2, 3, 1, 4)
    out = (acc_prefix + acc_tail) / jnp.maximum(l, 1e-30)[..., None]  # no valid slot: zeros
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
