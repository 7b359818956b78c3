"""Selectors and compaction: from scores and budgets to a smaller prefix.

Axis letters: B batch, K kv heads, C prefix slots, C' kept capacity.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.cache import LayerView

NEG = -jnp.inf


def ceil_keep_static(n: int, compression_ratio: float) -> int:
    """ceil((1 - r) * n), at least 1 (host ints; rounding guards float noise)."""
    return min(n, max(1, math.ceil(round((1.0 - compression_ratio) * n, 6))))


def ceil_keep(n: jax.Array, compression_ratio: float) -> jax.Array:
    """Traced version of `ceil_keep_static` for per-sequence valid counts."""
    kept = jnp.ceil(jnp.round((1.0 - compression_ratio) * n.astype(jnp.float32), 4))
    return jnp.clip(kept.astype(jnp.int32), 1, jnp.maximum(n, 1))


def mask_invalid(scores: jax.Array, length: jax.Array) -> jax.Array:
    """Set scores [B, K, C] of slots >= length [B, K] to -inf (padding is never selected)."""
    slot = jnp.arange(scores.shape[-1])
    return jnp.where(slot < length[..., None], scores.astype(jnp.float32), NEG)


def topk_mask(scores: jax.Array, n_keep: jax.Array, capacity: int) -> jax.Array:
    """Boolean mask [B, K, C] of the n_keep [B, K] best slots per row (n_keep <= capacity).

    Ties go to the earlier slot (a stable sort), so the choice never depends on the batch
    shape or backend (XLA's top-k does not promise an order among equal scores).
    """
    capacity = min(capacity, scores.shape[-1])
    idx = jnp.argsort(-scores, axis=-1, stable=True)[..., :capacity]  # [B, K, C'] best first
    chosen = jnp.arange(capacity) < n_keep[..., None]
    mask = jnp.zeros(scores.shape, bool)
    return jax.vmap(jax.vmap(lambda m, i, c: m.at[i].set(c)))(mask, idx, chosen)


def kept_indices(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Ascending indices of kept slots, padded at the end: mask [B, K, C] -> ([B, K, C'], [B, K])."""
    c = mask.shape[-1]
    slot = jnp.arange(c)
    order_key = jnp.where(mask, slot, c + slot)  # kept first, each group ascending
    idx = jnp.argsort(order_key, axis=-1)[..., :capacity]
    return idx.astype(jnp.int32), jnp.sum(mask, axis=-1).astype(jnp.int32)


def gather_slots(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, C, ...] gathered along C by idx [B, K, C'] -> [B, K, C', ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=2)


def compact(prefix: LayerView, mask: jax.Array, capacity: int) -> LayerView:
    """Gather the kept slots of `prefix` (mask [B, K, C]) into `capacity` slots, ascending.

    Slots beyond the per-head kept count are padding (length says how many are valid).
    """
    idx, length = kept_indices(mask, min(capacity, prefix.capacity))
    return dataclasses.replace(prefix, k=gather_slots(prefix.k, idx),
                               v=gather_slots(prefix.v, idx),
                               pos=jnp.take_along_axis(prefix.pos, idx, axis=2), length=length)
