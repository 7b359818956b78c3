"""Pure-jnp attention references: the specification of the Pallas kernels.

Two entry points:
  * `prefill_attention_reference`: causal self-attention over a right-padded prompt, chunked
    over queries so the T x T matrix is never held whole for long prompts.
  * `cached_attention_reference`: new query tokens against a layer's kept entries (a
    `LayerView` of its store segments, optionally with thin keys and values) plus its dense
    tail, one softmax over both.
Softmax and accumulation are in f32. Axis letters: B batch, T queries, N q heads, K kv heads,
G = N // K, H head dim, C prefix slots, S tail slots / keys, Dk kept key channels.
"""

import math

import jax
import jax.numpy as jnp

from kvjax.cache import LayerTail, LayerView

ATTN_IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_Q_CHUNK = 256


def resolve_attn_impl(attn_impl: str) -> str:
    """Map "auto" to the default backend's implementation: Pallas on GPU/TPU, else reference.

    A Pallas value forced off its backend runs that kernel in interpret mode (kvjax.dispatch).
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"{attn_impl=} is not one of {ATTN_IMPLS}")
    if attn_impl != "auto":
        return attn_impl
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in f32; fully masked rows give zeros (never NaN)."""
    logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(logits - m), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def _window_ok(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    if sliding_window is None:
        return jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    return q_pos - k_pos < sliding_window


def group_heads(q: jax.Array, n_kv: int) -> jax.Array:
    """[B, T, N, H] -> [B, T, K, G, H] (query heads of one kv head are contiguous)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, n_kv, n // n_kv, h)


def prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                                *, scale: float | None = None,
                                sliding_window: int | None = None) -> jax.Array:
    """Causal attention over a right-padded prompt.

    Queries are processed in static chunks; chunk i attends only to the keys that causality
    (and the sliding window) lets it see, so about half the T x T work is skipped and the
    T x T matrix is never held whole.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H].
      lengths: [B] valid prompt lengths (keys at index >= length are masked).
      scale: logit scale, default 1/sqrt(H).
      sliding_window: keys more than `sliding_window - 1` positions back are masked (Mistral).

    Returns:
      [B, T, N, H] attention outputs in q's dtype (rows of padding queries are garbage-free
      but meaningless).
    """
    return prefill_attention_and_column_sums(q, k, v, lengths, scale=scale,
                                             sliding_window=sliding_window,
                                             column_sums=False)[0]


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
        causal = (key_pos[None, :] <= q_pos[:, None]) & _window_ok(
            q_pos[:, None], key_pos[None, :], sliding_window)  # [Tc, S]
        valid = key_pos[None, :] < lengths[:, None]  # [B, S]
        yield start, stop, lo, masked_softmax(
            logits * scale, causal[None, None, None] & valid[:, None, None, None])


def prefill_attention_and_column_sums(q: jax.Array, k: jax.Array, v: jax.Array,
                                      lengths: jax.Array, *, scale: float | None = None,
                                      sliding_window: int | None = None,
                                      column_sums: bool = True
                                      ) -> tuple[jax.Array, jax.Array | None]:
    """`prefill_attention_reference` plus, from the same probabilities, their column sums
    over the valid query rows (H2O / ObservedAttention scores) at almost no extra cost.

    Returns:
      out [B, T, N, H] in q's dtype and colsums [B, N, T] f32 (None unless column_sums).
    """
    b, t, n, h = q.shape
    n_kv = k.shape[2]
    vt = v.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, K, S, H]
    outs, cols = [], jnp.zeros((b, n_kv, n // n_kv, t), jnp.float32) if column_sums else None
    for start, stop, lo, p in causal_chunks(q, k, lengths, scale=scale,
                                            sliding_window=sliding_window):
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", p, vt[:, :, lo:stop]))
        if column_sums:
            row_ok = (jnp.arange(start, stop)[None, :] < lengths[:, None])[:, None, None, :, None]
            cols = cols.at[..., lo:stop].add(jnp.sum(jnp.where(row_ok, p, 0.0), axis=3))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    return out, None if cols is None else cols.reshape(b, n, t)


def prefill_chunk(t: int) -> int:
    """Static query-chunk size: 256, grown so that a prompt has at most 16 chunks to unroll."""
    return max(_Q_CHUNK, -(-t // (16 * _Q_CHUNK)) * _Q_CHUNK)


def gather_query_channels(qg: jax.Array, channels: jax.Array) -> jax.Array:
    """qg [B, T, K, G, H], channels [B, K, Dk] -> [B, T, K, G, Dk]."""
    idx = channels[:, None, :, None, :]
    idx = jnp.broadcast_to(idx, qg.shape[:-1] + (channels.shape[-1],))
    return jnp.take_along_axis(qg, idx, axis=-1)


def cached_attention_reference(q: jax.Array, q_pos: jax.Array, prefix: LayerView,
                               tail: LayerTail, *, scale: float | None = None,
                               sliding_window: int | None = None) -> jax.Array:
    """Attention of new queries over a layer's kept entries and its dense tail, one softmax.

    Args:
      q: [B, T, N, H] post-RoPE queries of the new tokens.
      q_pos: [B, T] their positions (tail slots at positions > q_pos are masked: causal).
      prefix: k [B, K, C, Dk], v [B, K, C, Hv], pos, length [B, K], channels, value_channels.
      tail: k, v [B, K, S, H], pos [B, S], count [B]; the new tokens are already in it.
      scale: logit scale, default 1/sqrt(H) with the full H even for thin keys.
      sliding_window: Mistral-style window on positions.

    Returns:
      [B, T, N, H] outputs in q's dtype.
    """
    b, t, n, h = q.shape
    p, tl = prefix, tail
    scale = default_scale(h) if scale is None else scale
    qg = group_heads(q, p.k.shape[1])
    q_pref = qg if p.channels is None else gather_query_channels(qg, p.channels)
    lp = jnp.einsum("btkgd,bkcd->bkgtc", q_pref, p.k, preferred_element_type=jnp.float32)
    lt = jnp.einsum("btkgh,bksh->bkgts", qg, tl.k, preferred_element_type=jnp.float32)
    qp = q_pos[:, None, None, :, None]  # [B, 1, 1, T, 1]
    slot = jnp.arange(p.capacity)
    mp = (slot[None, None, :] < p.length[..., None])[:, :, None, None, :]
    mp = mp & _window_ok(qp, p.pos[:, :, None, None, :], sliding_window)
    mt = tail_mask(q_pos, tl, sliding_window)
    probs = masked_softmax(jnp.concatenate([lp, lt], -1) * scale,
                            jnp.concatenate([jnp.broadcast_to(mp, lp.shape),
                                             jnp.broadcast_to(mt, lt.shape)], -1))
    pp, pt = probs[..., :p.capacity], probs[..., p.capacity:]
    out_p = jnp.einsum("bkgtc,bkcd->btkgd", pp, p.v.astype(jnp.float32))
    if p.value_channels is not None:  # thin values: scatter back to the full width
        out_p = scatter_channels(out_p, p.value_channels, tl.v.shape[-1])
    out = out_p + jnp.einsum("bkgts,bksd->btkgd", pt, tl.v.astype(jnp.float32))
    return out.reshape(b, t, n, -1).astype(q.dtype)


def tail_mask(q_pos: jax.Array, tail: LayerTail, sliding_window: int | None) -> jax.Array:
    """[B, 1, 1, T, S] valid, causal (and windowed) tail slots for queries at q_pos [B, T]."""
    qp = q_pos[:, None, None, :, None]
    tpos = tail.pos[:, None, None, None, :]
    mt = (jnp.arange(tail.capacity)[None, :] < tail.count[:, None])[:, None, None, None, :]
    return mt & (tpos <= qp) & _window_ok(qp, tpos, sliding_window)


def scatter_channels(x: jax.Array, channels: jax.Array, width: int) -> jax.Array:
    """x [B, T, K, G, Dv] -> [B, T, K, G, width] with x in `channels` [B, K, Dv], zeros else."""
    one_hot = jax.nn.one_hot(channels, width, dtype=x.dtype)  # [B, K, Dv, width]
    return jnp.einsum("btkgd,bkdw->btkgw", x, one_hot)
