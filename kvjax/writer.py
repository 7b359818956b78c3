"""The one function that writes a selection into the store (docs/architecture.md).

Whatever the press, compression ends with dense per-layer views of the kept entries, stacked
over layers (`Selection`, M slots per view); `write_store` lays them into the slot rows. When
every view's width M fits (L * K * M <= P: the full cache, uniform presses) the segments sit at
fixed strides of M slots, a transpose with no scatter; otherwise (per-layer, per-head and
per-input budgets) they are packed end to end in (layer, kv head) order, so a row holds exactly
the kept entries plus the rounding of P to the kernels' alignment.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.cache import KVStore, LayerView

ALIGN = 8  # slots: the GPU decode kernel's tiled TMA copies start on multiples of 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """Kept entries of every layer, stacked (slots >= length are padding).

    Attributes:
      k: [L, B, K, M, Dk]; v: [L, B, K, M, Dv]; pos: [L, B, K, M] int32; length: [L, B, K];
      channels: [L, B, K, Dk] | None; value_channels: [L, B, K, Dv] | None;
      extra: [L, B, K, M, E] f32 per-slot hook state | None.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    channels: jax.Array | None = None
    value_channels: jax.Array | None = None
    extra: jax.Array | None = None


def aligned_slots(n: int, multiple: int = 1) -> int:
    """`n` slots rounded up to the kernels' alignment and to `multiple` (a quantized store's
    key groups), at least one aligned block."""
    step = ALIGN * multiple // math.gcd(ALIGN, multiple)
    return max(step, -(-n // step) * step)


def segment_offsets(length: jax.Array, rows: int) -> jax.Array:
    """Exclusive cumulative sums of length [B, L, K] within each store row, in (layer, head)
    order -> offsets [B, L, K] int32."""
    b, n_layers, n_kv = length.shape
    per_row = n_kv // rows
    x = length.reshape(b, n_layers, rows, per_row).transpose(0, 2, 1, 3)
    x = x.reshape(b, rows, n_layers * per_row)
    off = jnp.cumsum(x, axis=-1) - x
    off = off.reshape(b, rows, n_layers, per_row).transpose(0, 2, 1, 3)
    return off.reshape(b, n_layers, n_kv).astype(jnp.int32)


def write_store(sel: Selection, *, slots: int, rows: int = 1, max_segment: int,
                room: int | None = None) -> KVStore:
    """Pack a selection into a store of `rows` rows of `slots` slots.

    The caller guarantees that every row's total kept count fits in `slots` (the press's
    static bound); entries past it would be dropped, never written over another segment.
    With `room` (a decode budget that grows segments, `kvjax.presses.decode_budget`) every
    segment gets `room` slots (>= max_segment) whatever it holds now, and `slots` must fit
    L * K / R * room.

    Returns:
      KVStore with k [B, R, slots, Dk], v, pos, offset/length [B, L, K] and the channels.
    """
    if room is not None:
        sel, max_segment = with_width(sel, room), room
    n_layers, b, n_kv, m = sel.pos.shape
    if rows == 1 and n_layers * n_kv * m <= slots:
        return _strided(sel, slots=slots, max_segment=max_segment)
    length = sel.length.transpose(1, 0, 2).astype(jnp.int32)  # [B, L, K]
    offset = segment_offsets(length if room is None else jnp.full_like(length, room), rows)
    j = jnp.arange(m)
    dest = jnp.where(j < sel.length[..., None], offset.transpose(1, 0, 2)[..., None] + j,
                     slots)  # [L, B, K, M] slot within the head's row; padding: dropped

    def by_row(x):  # [L, B, K, M, ...] -> [B, R, L * (K / R) * M, ...] in (layer, head) order
        x = x.reshape((n_layers, b, rows, n_kv // rows, m) + x.shape[4:])
        return jnp.moveaxis(x, 0, 2).reshape((b, rows, -1) + x.shape[5:])

    dest_rows = by_row(dest)
    put = lambda row, ix, vv: row.at[ix].set(vv, mode="drop")

    def pack(x):  # x [L, B, K, M, ...] -> [B, R, slots, ...], every row scattered by itself
        buf = jnp.zeros((b, rows, slots) + x.shape[4:], x.dtype)
        return jax.vmap(jax.vmap(put))(buf, dest_rows, by_row(x))

    tr = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    return KVStore(k=pack(sel.k), v=pack(sel.v), pos=pack(sel.pos.astype(jnp.int32)),
                   offset=offset, length=length, channels=tr(sel.channels),
                   value_channels=tr(sel.value_channels),
                   extra=None if sel.extra is None else pack(sel.extra),
                   max_segment=max_segment)


def with_width(sel: Selection, width: int) -> Selection:
    """The selection's per-slot arrays padded or cut to `width` slots (entries past every
    length are padding, so a cut to >= the longest segment loses nothing)."""
    m = sel.pos.shape[3]

    def fit(x):
        if x is None:
            return None
        if width <= m:
            return x[:, :, :, :width]
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - m)] + [(0, 0)] * (x.ndim - 4))

    return dataclasses.replace(sel, k=fit(sel.k), v=fit(sel.v), pos=fit(sel.pos),
                               extra=fit(sel.extra))


def full_store(view: LayerView) -> KVStore:
    """Every entry of a stacked view (k [L, B, K, T, H]) in a one-row store: the full cache,
    with no press involved (the store `kvjax.compress.compress(None, ...)` writes for one
    prompt group)."""
    n_layers, _, n_kv, t = view.pos.shape
    sel = Selection(k=view.k, v=view.v, pos=view.pos, length=view.length)
    return write_store(sel, slots=aligned_slots(n_layers * n_kv * t), max_segment=max(1, t))


def _strided(sel: Selection, *, slots: int, max_segment: int) -> KVStore:
    """One row; (layer l, head k)'s segment starts at slot (l K + k) M (views side by side)."""
    n_layers, b, n_kv, m = sel.pos.shape
    used = n_layers * n_kv * m

    def lay(x):  # [L, B, K, M, ...] -> [B, 1, slots, ...]
        x = jnp.moveaxis(x, 1, 0).reshape((b, 1, used) + x.shape[4:])
        return jnp.pad(x, [(0, 0), (0, 0), (0, slots - used)] + [(0, 0)] * (x.ndim - 3))

    offset = (jnp.arange(n_layers * n_kv, dtype=jnp.int32) * m).reshape(n_layers, n_kv)
    tr = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    return KVStore(k=lay(sel.k), v=lay(sel.v), pos=lay(sel.pos.astype(jnp.int32)),
                   offset=jnp.broadcast_to(offset, (b, n_layers, n_kv)),
                   length=sel.length.transpose(1, 0, 2).astype(jnp.int32),
                   channels=tr(sel.channels), value_channels=tr(sel.value_channels),
                   extra=None if sel.extra is None else lay(sel.extra),
                   max_segment=max_segment)
