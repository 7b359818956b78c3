"""Pure-jnp attention reference of decode, and the helpers every attention reference shares.

`cached_attention_reference`: new query tokens against a layer's kept entries (a `LayerView`
of its store segments, optionally with thin keys and values) plus its dense tail, one softmax
over both; the specification of the decode kernels. The prefill reference (causal attention
and its column sums, the specification of the prefill kernels) is `kvjax/attention_scores.py`.
Softmax and accumulation are in f32. Axis letters: B batch, T queries, N q heads, K kv heads,
G = N // K, H head dim, C prefix slots, S tail slots / keys, Dk kept key channels.
"""

import math

import jax
import jax.numpy as jnp

from kvjax.cache import LayerView, Tail

ATTN_IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")


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


def window_ok(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Whether keys at k_pos lie inside the sliding window of queries at q_pos (broadcast)."""
    if sliding_window is None:
        return jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    return q_pos - k_pos < sliding_window


def group_heads(q: jax.Array, n_kv: int) -> jax.Array:
    """[B, T, N, H] -> [B, T, K, G, H] (query heads of one kv head are contiguous)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, n_kv, n // n_kv, h)


def gather_query_channels(qg: jax.Array, channels: jax.Array) -> jax.Array:
    """qg [B, T, K, G, H], channels [B, K, Dk] -> [B, T, K, G, Dk]."""
    idx = channels[:, None, :, None, :]
    idx = jnp.broadcast_to(idx, qg.shape[:-1] + (channels.shape[-1],))
    return jnp.take_along_axis(qg, idx, axis=-1)


def cached_attention_reference(q: jax.Array, q_pos: jax.Array, prefix: LayerView,
                               tail: Tail, *, scale: float | None = None,
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
    mp = mp & window_ok(qp, p.pos[:, :, None, None, :], sliding_window)
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


def tail_mask(q_pos: jax.Array, tail: Tail, sliding_window: int | None) -> jax.Array:
    """[B, 1, 1, T, S] valid, causal (and windowed) tail slots for queries at q_pos [B, T]."""
    qp = q_pos[:, None, None, :, None]
    tpos = tail.pos[:, None, None, None, :]
    mt = (jnp.arange(tail.capacity)[None, :] < tail.count[:, None])[:, None, None, None, :]
    return mt & (tpos <= qp) & window_ok(qp, tpos, sliding_window)


def scatter_channels(x: jax.Array, channels: jax.Array, width: int) -> jax.Array:
    """x [B, T, K, G, Dv] -> [B, T, K, G, width] with x in `channels` [B, K, Dv], zeros else."""
    one_hot = jax.nn.one_hot(channels, width, dtype=x.dtype)  # [B, K, Dv, width]
    return jnp.einsum("btkgd,bkdw->btkgw", x, one_hot)
