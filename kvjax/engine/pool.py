"""The engine's device state: one shared store (the pool) read by `max_running` slots.

The pool is a `KVStore` with batch 1 and `n_slots` slots per row, shared by every slot the
way `kvjax.context.share` shares a compressed context: the store's slot arrays are batch 1,
the table (`offset`, `length` [S, L, K]), the tail ([L, S, K, T, H]) and `next_pos` [S] are
per slot. A request's compressed store is written into one block of the pool
(`write_block`), and its slot's table points into that block (`attach`), so decode attention
(`kvjax.dispatch.decode_attention`: the decode kernels or the jnp block walk) reads every
request's kept entries in place, with no per-request padding to the longest request.

Shapes: S = max_running slots, L layers, K kv heads, R store rows, P pool slots per row,
T tail slots per slot (question + generated tokens), Dk / Dv key / value widths.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache, KVStore, init_tail
from kvjax.quant import quantize_token
from kvjax.writer import segment_offsets


def empty_pool(*, n_layers: int, n_kv: int, rows: int, n_slots: int, head_dim: int,
               max_running: int, tail: int, dtype, quant=None, max_segment: int) -> KVCache:
    """A pool cache with every slot empty (length 0, tail count 0).

    Args:
      n_slots: P, pool slots per store row; rows: R (divides n_kv).
      tail: T, tail slots per running slot; dtype: the compute dtype (keys, values, tail).
      quant: a "token"-scheme `kvjax.quant.KVQuant` for an int8/fp8 pool, or None.
      max_segment: static bound on any segment (the model's context length).
    """
    kdt = dtype if quant is None else quant.dtype
    scale = lambda: None if quant is None else jnp.zeros((1, rows, n_slots), jnp.float32)
    store = KVStore(k=jnp.zeros((1, rows, n_slots, head_dim), kdt),
                    v=jnp.zeros((1, rows, n_slots, head_dim), kdt),
                    pos=jnp.zeros((1, rows, n_slots), jnp.int32),
                    offset=jnp.zeros((max_running, n_layers, n_kv), jnp.int32),
                    length=jnp.zeros((max_running, n_layers, n_kv), jnp.int32),
                    k_scale=scale(), v_scale=scale(), max_segment=max_segment, quant=quant)
    return KVCache(store=store,
                   tail=init_tail(n_layers, max_running, n_kv, tail, head_dim, dtype),
                   next_pos=jnp.zeros((max_running,), jnp.int32))


def _by_row(x: jax.Array, rows: int) -> jax.Array:
    """[L, K] -> [R, L * K / R]: each row's segments in (layer, head) order."""
    n_layers, n_kv = x.shape
    return x.reshape(n_layers, rows, n_kv // rows).transpose(1, 0, 2).reshape(rows, -1)


@functools.partial(jax.jit, static_argnames=("width",))
def compact_store(store: KVStore, width: int | None = None) -> KVStore:
    """A batch-1 store with its segments packed end to end in every row, in `width` slots
    per row (default: the store's own).

    A uniform press's store lays segment s at a fixed stride of its static bound, so a row
    spans more slots than it keeps; packed (offsets from `kvjax.writer.segment_offsets`, the
    writer's own packed layout) a row's first `sum(length)` slots are exactly its kept
    entries, which is what the pool copies (`used_slots`, `write_block`).
    """
    rows = store.k.shape[1]
    new = segment_offsets(store.length, rows)  # [1, L, K]
    old_r, new_r = _by_row(store.offset[0], rows), _by_row(new[0], rows)
    len_r = _by_row(store.length[0], rows)
    j = jnp.arange(store.k.shape[2] if width is None else width)

    def row_index(old, start, n):  # [S] each -> [P] source slot of every destination slot
        ends = start + n
        s = jnp.clip(jnp.searchsorted(ends, j, side="right"), 0, ends.shape[0] - 1)
        return jnp.clip(jnp.where(j < ends[-1], old[s] + j - start[s], j), 0,
                        store.k.shape[2] - 1)

    src = jax.vmap(row_index)(old_r, new_r, len_r)  # [R, P]
    take = lambda x: None if x is None else jax.vmap(
        lambda row, ix: jnp.take(row, ix, axis=0))(x[0], src)[None]
    return dataclasses.replace(store, k=take(store.k), v=take(store.v), pos=take(store.pos),
                               extra=take(store.extra), k_scale=take(store.k_scale),
                               v_scale=take(store.v_scale), offset=new)


def slot_store(pool: KVCache, slot: int) -> KVStore:
    """Slot `slot`'s view of the pool: the shared slot arrays with its table [1, L, K]."""
    ps = pool.store
    return _replace(ps, offset=ps.offset[slot][None], length=ps.length[slot][None])


@functools.partial(jax.jit, static_argnames=("width",))
def slot_cache(pool: KVCache, slot, width: int) -> KVCache:
    """Slot `slot` as a batch-1 cache of its own: its segments copied out of the pool and
    packed in `width` slots per row (>= its block), its tail and next position."""
    t = pool.tail
    tail = type(t)(k=t.k[:, slot][:, None], v=t.v[:, slot][:, None], pos=t.pos[slot][None],
                   count=t.count[slot][None])
    store = compact_store(slot_store(pool, slot), width=width)
    return KVCache(store=store, tail=tail, next_pos=pool.next_pos[slot][None])


def _segment_ids(n_layers: int, n_kv: int, rows: int) -> tuple[jax.Array, jax.Array]:
    """(layer [R, S], kv head [R, S]) of every row's segments in (layer, head) order."""
    grid = jnp.mgrid[:n_layers, :n_kv].astype(jnp.int32)
    return _by_row(grid[0], rows), _by_row(grid[1], rows)


@functools.partial(jax.jit, static_argnames=("width",))
def absorb_tail(cache: KVCache, width: int) -> KVCache:
    """A batch-1 cache whose store also holds its tail's tokens: every (layer, kv head)
    segment grows by the tail's `count` entries (after its own, in position order), the
    segments packed end to end in `width` slots per row; the tail is emptied. A quantized
    store gets the tail's entries quantized with per-entry scales, as a rewrite does
    (`kvjax.cache.write_view`).

    What an engine slot does when its tail is full, and what a resumed request does with the
    tokens it had generated: attention over the result equals attention over store + tail
    (one softmax over the same entries)."""
    st, t = cache.store, cache.tail
    if st.extra is not None or st.channels is not None or st.value_channels is not None:
        raise ValueError("absorb_tail takes a store without hook state or thin channels")
    rows, p = st.k.shape[1], st.k.shape[2]
    n = t.count[0]
    length = st.length + n  # [1, L, K]
    offset = segment_offsets(length, rows)
    old_r, start_r = _by_row(st.offset[0], rows), _by_row(offset[0], rows)
    kept_r, lid, hid = _by_row(st.length[0], rows), *_segment_ids(*st.length.shape[1:], rows)
    j = jnp.arange(width)

    def row_index(old, start, kept):  # [S] each -> per destination slot: source and kind
        ends = start + kept + n
        s = jnp.clip(jnp.searchsorted(ends, j, side="right"), 0, ends.shape[0] - 1)
        i = j - start[s]
        valid = j < ends[-1]
        return (s, valid & (i < kept[s]), valid & (i >= kept[s]),
                jnp.clip(old[s] + i, 0, p - 1), jnp.clip(i - kept[s], 0, t.capacity - 1))

    s, from_store, from_tail, src, ti = jax.vmap(row_index)(old_r, start_r, kept_r)  # [R, W]
    layer, head = jnp.take_along_axis(lid, s, 1), jnp.take_along_axis(hid, s, 1)
    take = lambda x: jax.vmap(lambda row, ix: jnp.take(row, ix, axis=0))(x[0], src)
    tail_kv = lambda x: x[layer, 0, head, ti]  # [R, W, H]
    keep = lambda m, x: jnp.where(m.reshape(m.shape + (1,) * (x.ndim - 2)), x, 0)
    k_t, v_t = tail_kv(t.k), tail_kv(t.v)
    new = {}
    if st.quant is not None:
        (k_t, ks_t), (v_t, vs_t) = quantize_token(k_t, st.quant), quantize_token(v_t, st.quant)
        new.update(k_scale=keep(from_store, take(st.k_scale)) + keep(from_tail, ks_t),
                   v_scale=keep(from_store, take(st.v_scale)) + keep(from_tail, vs_t))
    merge = lambda a, b: jnp.where(from_store[..., None], a, jnp.where(
        from_tail[..., None], b.astype(a.dtype), jnp.zeros((), a.dtype)))
    pos = jnp.where(from_store, take(st.pos), jnp.where(from_tail, t.pos[0][ti], 0))
    new = {key: val[None] for key, val in new.items()}
    store = _replace(st, k=merge(take(st.k), k_t)[None], v=merge(take(st.v), v_t)[None],
                     pos=pos[None].astype(jnp.int32), offset=offset, length=length, **new)
    tail = type(t)(k=t.k, v=t.v, pos=t.pos, count=jnp.zeros_like(t.count))
    return KVCache(store=store, tail=tail, next_pos=cache.next_pos, hook=cache.hook)


def used_slots(store: KVStore) -> jax.Array:
    """[] int32: the slots of a batch-1 store's row that its segments span (its block size)."""
    return jnp.max(store.offset[0] + store.length[0])


def _put_rows(buf, vals, start, used):
    """buf [1, R, P, ...] with vals [1, R, M, ...] written at slots [start, start + used)."""
    j = jnp.arange(vals.shape[2])
    idx = jnp.where(j < used, start + j, buf.shape[2])  # past the end: dropped
    return buf.at[0, :, idx].set(jnp.moveaxis(vals[0], 1, 0).astype(buf.dtype), mode="drop")


@functools.partial(jax.jit, donate_argnames=("pool",))
def write_block(pool: KVCache, store: KVStore, start, used) -> KVCache:
    """The pool with a batch-1 compressed store's first `used` slots of every row at
    [start, start + used) (the block `kvjax.engine.blocks.BlockAllocator` gave it)."""
    ps = pool.store
    put = lambda buf, vals: None if buf is None else _put_rows(buf, vals, start, used)
    new = dict(k=put(ps.k, store.k), v=put(ps.v, store.v), pos=put(ps.pos, store.pos))
    if ps.k_scale is not None:
        new.update(k_scale=put(ps.k_scale, store.k_scale), v_scale=put(ps.v_scale, store.v_scale))
    return KVCache(store=_replace(ps, **new), tail=pool.tail, next_pos=pool.next_pos)


@functools.partial(jax.jit, donate_argnames=("pool",))
def attach(pool: KVCache, cache: KVCache, slot, start) -> KVCache:
    """The pool with slot `slot` reading a batch-1 cache: its table shifted to the block at
    `start`, its tail (question tokens appended after compression) and its next position."""
    ps, t, src = pool.store, pool.tail, cache.tail
    n = min(src.capacity, t.capacity)  # the engine checked count <= the pool's tail at submit
    store = _replace(ps, offset=ps.offset.at[slot].set(cache.store.offset[0] + start),
                     length=ps.length.at[slot].set(cache.store.length[0]))
    tail = type(t)(k=t.k.at[:, slot, :, :n].set(src.k[:, 0, :, :n].astype(t.k.dtype)),
                   v=t.v.at[:, slot, :, :n].set(src.v[:, 0, :, :n].astype(t.v.dtype)),
                   pos=t.pos.at[slot, :n].set(src.pos[0, :n]),
                   count=t.count.at[slot].set(src.count[0]))
    return KVCache(store=store, tail=tail, next_pos=pool.next_pos.at[slot].set(cache.next_pos[0]))


@functools.partial(jax.jit, donate_argnames=("pool",))
def move_blocks(pool: KVCache, src: jax.Array, delta: jax.Array) -> KVCache:
    """The pool after compaction: destination slot j of every row takes source slot src[j]
    ([P] int32, the identity outside moved blocks) and slot s's table shifts by delta[s]
    ([S] int32, its block's move). One gather per pool array, so overlapping moves are
    safe."""
    ps = pool.store
    take = lambda x: None if x is None else jnp.take(x, src, axis=2)
    store = _replace(ps, k=take(ps.k), v=take(ps.v), pos=take(ps.pos), extra=take(ps.extra),
                     k_scale=take(ps.k_scale), v_scale=take(ps.v_scale),
                     offset=ps.offset + delta[:, None, None])
    return KVCache(store=store, tail=pool.tail, next_pos=pool.next_pos)


def compaction_moves(n_slots: int, n_running: int, moved, slot_blocks: dict
                     ) -> tuple[jax.Array, jax.Array]:
    """(src [P], delta [S]) for `move_blocks` from `BlockAllocator.compact`'s moves
    [(block, old start)] and the running slots' blocks {slot: block}."""
    src = np.arange(n_slots, dtype=np.int32)
    old = {id(b): start for b, start in moved}
    for block, start in moved:
        src[block.start:block.start + block.size] = np.arange(start, start + block.size)
    delta = np.zeros(n_running, np.int32)
    for slot, block in slot_blocks.items():
        if id(block) in old:
            delta[slot] = block.start - old[id(block)]
    return jnp.asarray(src), jnp.asarray(delta)


@functools.partial(jax.jit, donate_argnames=("pool",))
def detach(pool: KVCache, slot) -> KVCache:
    """The pool with slot `slot` empty (nothing kept, nothing in its tail)."""
    ps, t = pool.store, pool.tail
    store = _replace(ps, length=ps.length.at[slot].set(0))
    tail = type(t)(k=t.k, v=t.v, pos=t.pos, count=t.count.at[slot].set(0))
    return KVCache(store=store, tail=tail, next_pos=pool.next_pos)


def _replace(store: KVStore, **kw) -> KVStore:
    return dataclasses.replace(store, **kw)
