"""The KV cache: one slot store shared by every layer, a segment table, and a dense tail.

Every press writes into the same layout (docs/architecture.md, "The store"):

* `KVStore`: slot arrays `k [B, R, P, Dk]`, `v [B, R, P, Dv]`, `pos [B, R, P]` (original
  token positions) and a segment table `offset, length [B, L, K]`: kv head k of layer l owns
  slots [offset, offset + length) of row `k // (K // R)`. Uniform, per-layer (PyramidKV,
  ZigZagKV), per-head (AdaKV) and per-group (UNComp) budgets are table contents; P is static
  (the sum of the budgets' static bounds). ThinK's kept channels are table columns
  (`channels [B, L, K, Dk]`, `value_channels`), so thin keys are the store's `Dk < H`.
* `Tail`: tokens appended after prefill, dense and full width, `k, v [L, B, K, S, H]` stacked
  over layers (`Tail.layer(l)`: the same class holding one layer's `[B, K, S, H]`); positions
  and count are shared by all layers.
* `KVCache`: store + tail + `next_pos [B]` + the static decode hook (`kvjax.hooks`).

Axis letters: B batch, L layers, K kv heads, R store rows, P slots per row, M view width,
S tail slots, H head dim, Dk / Dv kept key / value channels, E per-slot hook state.

A quantized store (`kvjax.quant`) holds k and v in int8 / float8_e4m3fn with f32 scales
(`k_scale`, `v_scale`); `gather_kv` dequantizes what it gathers, so every reader sees floats.
"""

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quant import KVQuant, dequantize, quantize_token

if TYPE_CHECKING:  # the hook protocol imports this module
    from kvjax.hooks import DecodeHook


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStore:
    """Kept prompt entries of every layer and kv head, addressed by a segment table.

    Attributes:
      k: [B, R, P, Dk] post-RoPE keys; v: [B, R, P, Dv] values; pos: [B, R, P] int32.
      offset, length: [B, L, K] int32 segment start (in the head's row) and size.
      channels: [B, L, K, Dk] int32 kept key channels (ThinK), None for full-width keys.
      value_channels: [B, L, K, Dv] int32 kept value channels, None for full width.
      extra: [B, R, P, E] f32 per-slot state of a decode hook (ring rows), or None.
      k_scale, v_scale: f32 scales of a quantized store (`quant`), else None: `TokenScales`
        k_scale [B, R, P]; `KiviScales` k_scale [B, R, P // group, Dk]; v_scale [B, R, P].
      max_segment: static bound on every `length` (the width of `layer_view`).
      quant: static `kvjax.quant.KVQuant` of a quantized store (k, v in its dtype), or None.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    offset: jax.Array
    length: jax.Array
    channels: jax.Array | None = None
    value_channels: jax.Array | None = None
    extra: jax.Array | None = None
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    max_segment: int = dataclasses.field(metadata=dict(static=True), default=1)
    quant: KVQuant | None = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def n_layers(self) -> int:
        return self.length.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.length.shape[2]

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def head_rows(self) -> np.ndarray:
        """[K] static store row of every kv head."""
        return head_rows(self.n_kv_heads, self.rows)


def head_rows(n_kv: int, rows: int) -> np.ndarray:
    """[K] store row of every kv head: consecutive heads share a row."""
    if rows < 1 or n_kv % rows:
        raise ValueError(f"{rows=} store rows must divide the {n_kv} kv heads")
    return np.arange(n_kv) // (n_kv // rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tail:
    """Dense, full-width tokens appended after prefill: every layer's, or one layer's.

    Attributes:
      k, v: [L, B, K, S, H] stacked over layers (`KVCache.tail`, `init_tail`) or
        [B, K, S, H] for one layer (`Tail.layer`, what attention reads);
      pos: [B, S] int32 positions; count: [B] valid slots (in order). Both are shared by all
        layers.
      score: [L, B, K, S] (or [B, K, S] for one layer) f32 per-slot state of a decode hook
        that scores tokens as they arrive (KVzap, TOVA, H2O), or None.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    count: jax.Array
    score: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[-2]

    def layer(self, layer) -> "Tail":
        """Layer `layer`'s tail, k, v [B, K, S, H] (`layer` a static int or a traced index)."""
        if self.k.ndim != 5:
            raise ValueError(f"tail k of shape {self.k.shape} is one layer's, not stacked over "
                             "layers [L, B, K, S, H]")
        return Tail(k=self.k[layer], v=self.v[layer], pos=self.pos, count=self.count,
                    score=None if self.score is None else self.score[layer])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """A layer's segments gathered into dense `[B, K, M]` arrays (a copy; slots >= length are
    padding). What scorers, selectors and the attention reference read.

    Attributes:
      k: [B, K, M, Dk]; v: [B, K, M, Dv]; pos: [B, K, M] int32; length: [B, K] int32;
      channels: [B, K, Dk] | None; value_channels: [B, K, Dv] | None.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    channels: jax.Array | None = None
    value_channels: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]  # also right for views stacked over layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The store, the tail, the next RoPE position and the decode hook.

    Attributes:
      store: kept prompt entries (`KVStore`).
      tail: tokens appended later (`Tail`).
      next_pos: [B] int32 position of the next token; continues from the original prompt
        length however many slots survived compression.
      hook: the decode-time hook (`kvjax.hooks.DecodeHook`: periodic merge, ring), or None;
        a pytree whose leaves are only its value fields (a threshold), static otherwise.
    """

    store: KVStore
    tail: Tail
    next_pos: jax.Array
    hook: "DecodeHook | None" = None

    @property
    def n_layers(self) -> int:
        return self.store.n_layers

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by every array of the cache (what device memory really holds)."""
        return sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(self))

    def view(self, layer, width: int | None = None) -> LayerView:
        """Layer `layer`'s segments as a dense LayerView (see `layer_view`)."""
        return layer_view(self.store, layer, width)


def slot_index(store: KVStore, layer, width: int, start=0) -> tuple[jax.Array, jax.Array]:
    """Flat slot indices [B, K, width] of segment entries [start, start + width) of layer
    `layer` (clipped into the store) and their validity [B, K, width] (entry < length)."""
    off, ln = store.offset[:, layer], store.length[:, layer]  # [B, K]
    j = start + jnp.arange(width)
    rows = jnp.asarray(store.head_rows() * store.slots, jnp.int32)[None, :, None]
    idx = rows + jnp.clip(off[..., None] + j, 0, store.slots - 1)
    return idx, j < ln[..., None]


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, R, P, ...] gathered at flat slot indices idx [B, K, M] -> [B, K, M, ...].

    Every row is gathered by itself (head k reads row k // (K // R) only), so a store whose
    rows are sharded over a mesh's "model" axis is read where it lives, without a collective.
    A store shared by a batch (x with batch 1, idx with batch B: `kvjax.context.share`) is
    read by every sequence without being copied."""
    b, r, p = x.shape[:3]
    nb, nk, m = idx.shape
    local = (idx % p).reshape(nb, r, nk // r, m)
    per_row = jax.vmap(lambda row, ix: row[ix])  # [R, P, ...], [R, K/R, M] -> [R, K/R, M, ...]
    if b == 1 and nb > 1:
        out = jax.vmap(per_row, in_axes=(None, 0))(x[0], local)
    else:
        out = jax.vmap(per_row)(x, local)
    return out.reshape(idx.shape + x.shape[3:])


def scatter_rows(buf: jax.Array, idx: jax.Array, ok: jax.Array, vals: jax.Array) -> jax.Array:
    """buf [B, R, P, ...] with vals [B, K, M, ...] written at flat slot indices idx [B, K, M]
    where ok [B, K, M] (row by row, like `gather_rows`; other entries dropped)."""
    b, r, p = buf.shape[:3]
    nk, m = idx.shape[1:]
    local = jnp.where(ok, idx % p, p).reshape(b, r, nk // r * m)
    vals = vals.reshape((b, r, nk // r * m) + vals.shape[3:]).astype(buf.dtype)
    put = lambda row, ix, vv: row.at[ix].set(vv, mode="drop")
    return jax.vmap(jax.vmap(put))(buf, local, vals)


def gather_kv(store: KVStore, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values at flat slot indices idx [B, K, M] -> k [B, K, M, Dk], v [B, K, M, Dv];
    a quantized store's entries come back dequantized (f32)."""
    k, v = gather_rows(store.k, idx), gather_rows(store.v, idx)
    if store.quant is None:
        return k, v
    scheme = store.quant.scheme  # KIVI: P is a multiple of the group, row * P/g + slot // g
    ks = scheme.per_channel(gather_rows(store.k_scale, scheme.scale_slots(idx)))
    return dequantize(k, ks), dequantize(v, gather_rows(store.v_scale, idx)[..., None])


def quantize_store(store: KVStore, quant: KVQuant) -> KVStore:
    """The store with k, v in `quant`'s dtype and their scales (from a float store)."""
    k, ks = quant.scheme.quantize_keys(store.k, quant)
    v, vs = quantize_token(store.v, quant)
    return dataclasses.replace(store, k=k, v=v, k_scale=ks, v_scale=vs, quant=quant)


def dequantize_store(store: KVStore, dtype=jnp.float32) -> KVStore:
    """A quantized store as a float store of `dtype` (the inverse of `quantize_store` up to
    rounding); a float store unchanged."""
    if store.quant is None:
        return store
    scheme = store.quant.scheme
    ks = scheme.per_channel(store.k_scale) if scheme.per_entry else scheme.expand(store.k_scale)
    return dataclasses.replace(
        store, k=dequantize(store.k, ks).astype(dtype),
        v=dequantize(store.v, store.v_scale[..., None]).astype(dtype), k_scale=None,
        v_scale=None, quant=None)


def layer_view(store: KVStore, layer, width: int | None = None) -> LayerView:
    """Gather layer `layer`'s segments into a LayerView of `width` (default max_segment) slots.

    `layer` may be a traced index (inside a scan over layers).
    """
    width = store.max_segment if width is None else width
    idx, ok = slot_index(store, layer, width)
    pick = lambda x: None if x is None else x[:, layer]
    k, v = gather_kv(store, idx)
    return LayerView(k=k, v=v,
                     pos=jnp.where(ok, gather_rows(store.pos, idx), 0),
                     length=store.length[:, layer], channels=pick(store.channels),
                     value_channels=pick(store.value_channels))


def init_tail(n_layers: int, batch: int, n_kv: int, capacity: int, head_dim: int,
              dtype) -> Tail:
    """An empty tail of `capacity` slots per layer and sequence."""
    shape = (n_layers, batch, n_kv, capacity, head_dim)
    return Tail(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                pos=jnp.zeros((batch, capacity), jnp.int32),
                count=jnp.zeros((batch,), jnp.int32))


def write_tail(tail: Tail, layer, k: jax.Array, v: jax.Array, start: jax.Array) -> Tail:
    """Write T new tokens of layer `layer` at slots [start, start + T) of every sequence.

    Args:
      k, v: [B, T, K, H] new keys and values; start: [B] first slot per sequence. Slots past
        the capacity are dropped (the loops never let a real token get there).
    """
    b, t, n_kv, _ = k.shape
    slot = (start[:, None] + jnp.arange(t))[:, None, :]  # [B, 1, T]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(n_kv)[None, :, None]
    put = lambda buf, x: buf.at[layer, bi, hi, slot].set(
        x.transpose(0, 2, 1, 3).astype(buf.dtype), mode="drop")
    return dataclasses.replace(tail, k=put(tail.k, k), v=put(tail.v, v))


def advance_tail(tail: Tail, positions: jax.Array, n_new: jax.Array) -> Tail:
    """Record the positions [B, T] of T new tokens (n_new [B] real) and advance `count`."""
    t = positions.shape[1]
    slot = tail.count[:, None] + jnp.arange(t)
    bi = jnp.arange(positions.shape[0])[:, None]
    pos = tail.pos.at[bi, slot].set(positions.astype(jnp.int32), mode="drop")
    return dataclasses.replace(tail, pos=pos, count=tail.count + n_new.astype(jnp.int32))


def prefix_nbytes(store: KVStore, n_slots: int) -> int:
    """Key and value bytes of `n_slots` stored entries, a quantized store's scales included
    (a KIVI key scale counts 1/group of its bytes per entry)."""
    per = store.k.shape[-1] * store.k.dtype.itemsize + store.v.shape[-1] * store.v.dtype.itemsize
    if store.quant is None:
        return n_slots * per
    scale_bytes = scale_nbytes(store) * n_slots / (store.k.shape[0] * store.rows * store.slots)
    return int(round(n_slots * per + scale_bytes))


def scale_nbytes(store: KVStore) -> int:
    """Bytes of a quantized store's scale arrays (0 for a float store)."""
    return sum(x.nbytes for x in (store.k_scale, store.v_scale) if x is not None)


def kv_nbytes_needed(cache: KVCache) -> int:
    """Bytes of keys and values a layout without padding would need (valid entries only).

    Reads `length` and `count` to the host (call outside jit).
    """
    tail = cache.tail
    n_kv = tail.k.shape[-3]
    tail_slots = int(jnp.sum(jnp.minimum(tail.count, tail.capacity))) * cache.n_layers * n_kv
    tail_bytes = tail_slots * tail.k.shape[-1] * (tail.k.dtype.itemsize + tail.v.dtype.itemsize)
    return prefix_nbytes(cache.store, int(jnp.sum(cache.store.length))) + tail_bytes


def kept_positions(cache: KVCache, layer: int) -> list[list[np.ndarray]]:
    """For each sequence and kv head, the sorted original positions layer `layer` holds.

    Prefix segment and tail together, as numpy int arrays (host values; call outside jit).
    """
    store, tail = cache.store, cache.tail
    view = layer_view(store, layer)
    pos, length = np.asarray(view.pos), np.asarray(view.length)
    tpos, count = np.asarray(tail.pos), np.minimum(np.asarray(tail.count), tail.capacity)
    return [[np.sort(np.concatenate([pos[b, h, :length[b, h]], tpos[b, :count[b]]]))
             for h in range(length.shape[1])] for b in range(length.shape[0])]


def write_view(store: KVStore, layer, view: LayerView, extra: jax.Array | None = None,
               *, resize: bool = False) -> KVStore:
    """Write a [B, K, M] view back over layer `layer`'s segments (entries j < length go to
    slot offset + j). `extra` [B, K, M, E] updates the hook state. Lengths stay unchanged, or
    with `resize` become the view's (a decode budget: the caller keeps every length within
    the segment's room, `max_segment`).

    Used by decode hooks that rewrite a segment (periodic merge, ring decode). A quantized
    store with per-entry scales (`TokenScales`) gets the view's entries quantized and written with
    their scales; a KIVI store (scales shared by slot groups) is dequantized, written and
    requantized whole (an untouched entry requantizes to the same bytes).
    """
    if store.quant is not None and not store.quant.scheme.per_entry:
        written = write_view(dequantize_store(store), layer, view, extra, resize=resize)
        return quantize_store(written, store.quant)
    if resize:
        store = dataclasses.replace(
            store, length=store.length.at[:, layer].set(view.length.astype(jnp.int32)))
    idx, ok = slot_index(store, layer, view.capacity)
    put = lambda buf, x: scatter_rows(buf, idx, ok, x)

    k, v, scales = view.k, view.v, {}
    if store.quant is not None:  # per-entry scales: quantize the written entries only
        (k, ks), (v, vs) = quantize_token(k, store.quant), quantize_token(v, store.quant)
        scales = dict(k_scale=put(store.k_scale, ks), v_scale=put(store.v_scale, vs))
    return dataclasses.replace(
        store, k=put(store.k, k), v=put(store.v, v), pos=put(store.pos, view.pos),
        extra=store.extra if extra is None else put(store.extra, extra), **scales)
