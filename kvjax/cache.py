"""The explicit KV-cache pytree (ARCHITECTURE.md section 3).

Per layer a `LayerCache` holds a compressed **prefix** (what survived compression of the prompt,
with per-kv-head valid lengths and original positions) and a dense **tail** (tokens appended
after prefill). Layers are a tuple, so per-layer capacities (PyramidKV, ZigZagKV) are real
per-layer array sizes. Axis letters: B batch, K kv heads, C prefix slots, S tail slots,
H head dim, Dk kept key channels.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prompt keys/values that survived compression.

    Attributes:
      k: [B, K, C, Dk] post-RoPE keys (Dk < H when key channels were pruned).
      v: [B, K, C, Hv] values.
      pos: [B, K, C] int32 original token positions of the slots.
      length: [B, K] int32 number of valid slots per kv head (slots >= length are padding).
      channels: [B, K, Dk] int32 kept key-channel indices, or None when keys are full width.
      value_channels: [B, K, Hv] int32 kept value-channel indices (ThinK value pruning), or
        None when values are full width; pruned output channels get no prefix contribution.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    channels: jax.Array | None = None
    value_channels: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tail:
    """Dense, full-width tokens appended after prefill (question tokens, generated tokens).

    Attributes:
      k: [B, K, S, H] post-RoPE keys.
      v: [B, K, S, H] values.
      pos: [B, S] int32 positions of the slots.
      count: [B] int32 number of valid slots (slots are filled in order).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    count: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache: a prefix (own arrays, or a segment of the shared Pool) and a tail."""

    prefix: "Prefix | PoolSegment"
    tail: Tail


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """One flat prefix pool per sequence shared by all layers (per-input layer budgets).

    Layer l of sequence b owns slots [offset[b, l], offset[b, l] + length[b, l]) of every kv
    head; the pool has sum_l budget_l slots per sequence (a static total; ZigZagKV rounds it up
    to a multiple of 8 for the GPU kernel's TMA), so the bytes held equal the kept entries
    whatever the per-input budget vector. Decode kernels read segments in place (PoolSegment).

    Attributes:
      k: [B, K, P, H]; v: [B, K, P, Hv]; pos: [B, K, P] int32 original positions.
      offset, length: [B, L] int32 segment starts and sizes.
      max_segment: static bound on any segment's size (the view's width).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    offset: jax.Array
    length: jax.Array
    max_segment: int = dataclasses.field(metadata=dict(static=True), default=1)

    def view(self, layer: int) -> Prefix:
        """Layer `layer`'s segment as a Prefix of `max_segment` slots (gather, masked by
        length); what the reference attention reads."""
        take = lambda x: self.take(x, layer)
        length = jnp.broadcast_to(self.length[:, layer, None], self.k.shape[:2])
        return Prefix(k=take(self.k), v=take(self.v), pos=take(self.pos), length=length)

    def take(self, x: jax.Array, layer: int) -> jax.Array:
        """Gather layer `layer`'s `max_segment` slots of a pool array x [B, K, P, ...]."""
        p = self.k.shape[2]
        idx = self.offset[:, layer, None] + jnp.arange(self.max_segment)  # [B, S]
        idx = jnp.clip(idx, 0, p - 1)[:, None, :]
        idx = jnp.broadcast_to(idx, self.k.shape[:2] + (self.max_segment,))
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PoolSegment:
    """Layer `layer`'s segment of a Pool, left in place: what decode attention reads.

    The Pallas decode kernels read slots [offset[b, h], offset[b, h] + length[b, h]) of the
    pool arrays directly (no copy); `view()` gathers the segment into a padded Prefix, which is
    what the reference attention (the kernels' spec) reads. `k`, `v`, `pos` gather on access,
    so code written for a Prefix (inspection, memory reports) reads a segment unchanged.

    Attributes:
      pool: the shared Pool (k [B, K, P, H], v [B, K, P, Hv], pos [B, K, P]).
      layer: static index of the layer whose segment this is.
    """

    pool: Pool
    layer: int = dataclasses.field(metadata={"static": True}, default=0)

    channels = None  # pool keys and values are full width
    value_channels = None

    @property
    def offset(self) -> jax.Array:
        """[B, K] int32 first pool slot of the segment (the same for every kv head)."""
        return jnp.broadcast_to(self.pool.offset[:, self.layer, None], self.pool.k.shape[:2])

    @property
    def length(self) -> jax.Array:
        """[B, K] int32 valid slots of the segment."""
        return jnp.broadcast_to(self.pool.length[:, self.layer, None], self.pool.k.shape[:2])

    @property
    def capacity(self) -> int:
        """Static bound on the segment's length (the width of `view()`)."""
        return self.pool.max_segment

    def view(self) -> Prefix:
        """The segment gathered into a Prefix of `capacity` slots (a copy)."""
        return self.pool.view(self.layer)

    @property
    def k(self) -> jax.Array:
        """[B, K, capacity, H] the segment's keys (gathered)."""
        return self.pool.take(self.pool.k, self.layer)

    @property
    def v(self) -> jax.Array:
        """[B, K, capacity, Hv] the segment's values (gathered)."""
        return self.pool.take(self.pool.v, self.layer)

    @property
    def pos(self) -> jax.Array:
        """[B, K, capacity] the segment's original positions (gathered)."""
        return self.pool.take(self.pool.pos, self.layer)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers plus the next RoPE position of every sequence.

    Attributes:
      layers: one LayerCache per layer (a tuple: capacities may differ per layer).
      next_pos: [B] int32 position of the next token; continues from the original prompt
        length however many slots survived compression.
      pool: a shared prefix Pool (ZigZagKV's per-input layer budgets); then every layer's own
        prefix is empty and `layer(i)` has a PoolSegment (the segment in place) as prefix.
    """

    layers: tuple[LayerCache, ...]
    next_pos: jax.Array
    pool: Pool | None = None

    def layer(self, i: int) -> LayerCache:
        """Layer i as attention reads it (a PoolSegment as its prefix when pooled: no copy)."""
        if self.pool is None:
            return self.layers[i]
        return LayerCache(prefix=PoolSegment(pool=self.pool, layer=i), tail=self.layers[i].tail)

    def dense_layer(self, i: int) -> LayerCache:
        """Layer i as one dense LayerCache for inspection (heat maps, tests): the pool segment
        gathered, UNComp's head groups padded to the largest and put back in head order."""
        layer = self.layer(i)
        return layer.dense() if hasattr(layer, "parts") else layer

    def store(self, i: int, layer: LayerCache) -> LayerCache:
        """What to keep in `layers[i]` after a decode step returned `layer`."""
        if self.pool is None:
            return layer
        return dataclasses.replace(self.layers[i], tail=layer.tail)

    @property
    def nbytes(self) -> int:
        """Bytes held by every array of the cache (what device memory really holds)."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    @property
    def tail_capacity(self) -> int:
        return self.layers[0].tail.capacity


def init_tail(batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> Tail:
    """Return an empty tail of `capacity` slots per sequence."""
    shape = (batch, n_kv_heads, capacity, head_dim)
    return Tail(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                pos=jnp.zeros((batch, capacity), jnp.int32),
                count=jnp.zeros((batch,), jnp.int32))


def prefix_from_prompt(k: jax.Array, v: jax.Array, lengths: jax.Array) -> Prefix:
    """Wrap the full prompt keys/values as an uncompressed prefix.

    Args:
      k: [B, T, K, H] post-RoPE prompt keys (right padded).
      v: [B, T, K, H] prompt values.
      lengths: [B] true prompt lengths.

    Returns:
      A Prefix with C = T slots, `length[b, :] = lengths[b]` and `pos = arange(T)`.
    """
    b, t, n_kv, _ = k.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, n_kv, t))
    length = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None], (b, n_kv))
    return Prefix(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), pos=pos, length=length)


def append_to_tail(tail: Tail, k: jax.Array, v: jax.Array, positions: jax.Array,
                   n_new: jax.Array) -> Tail:
    """Write T new tokens per sequence at `count` and advance `count` by `n_new`.

    Args:
      tail: the current tail.
      k: [B, T, K, H] new post-RoPE keys; v: [B, T, K, H] new values.
      positions: [B, T] positions of the new tokens.
      n_new: [B] how many of the T tokens are real (the rest is padding and will be
        overwritten by later writes; they sit beyond `count` and are never attended).

    Returns:
      The tail with the tokens written. The caller guarantees count + T <= capacity.
    """
    def write_one(buf, new, start):  # buf [K, S, H], new [K, T, H]
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0))

    def write_pos(buf, new, start):  # buf [S], new [T]
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (start,))

    start = tail.count
    new_k = jax.vmap(write_one)(tail.k, k.transpose(0, 2, 1, 3), start)
    new_v = jax.vmap(write_one)(tail.v, v.transpose(0, 2, 1, 3), start)
    new_pos = jax.vmap(write_pos)(tail.pos, positions, start)
    return Tail(k=new_k, v=new_v, pos=new_pos, count=tail.count + n_new.astype(jnp.int32))


def layer_parts(layer) -> tuple[LayerCache, ...]:
    """The dense LayerCaches of a layer: a grouped layer's groups, or the layer itself."""
    return getattr(layer, "parts", (layer,))


def kv_nbytes_needed(cache: KVCache) -> int:
    """Bytes of keys and values a layout without padding would need (valid entries only).

    Uses host values of `length` and `count` (call outside jit).
    """
    total = 0
    if cache.pool is not None:
        pl = cache.pool
        slots = int(jnp.sum(pl.length)) * pl.k.shape[1]
        total += slots * (pl.k.shape[-1] * pl.k.dtype.itemsize
                          + pl.v.shape[-1] * pl.v.dtype.itemsize)
    for layer in (part for layer in cache.layers for part in layer_parts(layer)):
        p, t = layer.prefix, layer.tail
        slots = int(jnp.sum(p.length))
        total += slots * (p.k.shape[-1] * p.k.dtype.itemsize + p.v.shape[-1] * p.v.dtype.itemsize)
        tail_slots = int(jnp.sum(t.count)) * t.k.shape[1]
        total += tail_slots * t.k.shape[-1] * (t.k.dtype.itemsize + t.v.dtype.itemsize)
    return total


def ceil_budget(n: int, compression_ratio: float) -> int:
    """Slots kept out of `n` at `compression_ratio`: ceil((1 - r) * n), at least 1."""
    return max(1, math.ceil(round((1.0 - compression_ratio) * n, 9)))
