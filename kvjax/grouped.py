"""Head-grouped layer caches: each group of kv heads stored densely at its own capacity.

UNComp (arXiv 2410.03090) gives high-entropy kv heads larger budgets than low-entropy ones. A
single [B, K, C, H] prefix would hold every head at the largest budget; here the heads of a
group share one dense `LayerCache` of capacity C_g, so the bytes held equal the kept entries
(up to one slot per head of integer rounding).

Two decode modes:
  * tail (default): every group appends new tokens to its own dense tail, as a plain layer;
  * ring (UNComp's official decode): no tail; each group holds exactly C_g slots. Every new
    token enters the candidates, its attention row over them joins a ring of the last W
    query rows (the oldest row leaves), and the group re-selects C_g slots SnapKV-style: the
    most recent W slots always, the rest by the W rows' mean attention, pooled along the
    slots. Static shapes, one compilation for any number of steps.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import default_scale
from kvjax.cache import LayerCache, Prefix, Tail
from kvjax.presses.select import gather_slots, kept_indices, topk_mask
from kvjax.presses.window import pool1d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedLayerCache:
    """One layer's cache split by kv-head groups.

    Attributes:
      parts: one LayerCache per group, prefix k [B, K_g, C_g, H] (tails [B, K_g, S, H]; in
        ring mode S = 0).
      rows: ring mode only: per group [B, K_g, G, W, C_g] f32, the attention of the last W
        queries (each of the G query heads of a kv head) over the group's slots; None in tail
        mode.
      heads: static kv-head ids of every group (a partition of range(K), each ascending).
      kernel_size, pooling: static SnapKV pooling of the ring re-selection.
    """

    parts: tuple[LayerCache, ...]
    rows: tuple[jax.Array, ...] | None = None
    heads: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True),
                                                            default=())
    kernel_size: int = dataclasses.field(metadata=dict(static=True), default=7)
    pooling: str = dataclasses.field(metadata=dict(static=True), default="max")

    @property
    def ring(self) -> bool:
        return self.rows is not None

    @property
    def tail(self) -> Tail:
        """The first group's tail (every group's tail has the same capacity and count)."""
        return self.parts[0].tail

    @property
    def n_kv_heads(self) -> int:
        return sum(len(h) for h in self.heads)

    def dense(self) -> LayerCache:
        """The same entries as one LayerCache [B, K, max C_g, H], heads in their original
        order, groups padded to the largest capacity (for inspection, e.g. heat maps)."""
        c = max(p.prefix.capacity for p in self.parts)
        order = np.argsort(np.concatenate(self.heads))
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, c - x.shape[2])]
                                + [(0, 0)] * (x.ndim - 3))
        cat = lambda xs: jnp.concatenate(xs, axis=1)[:, order]
        ps, ts = [p.prefix for p in self.parts], [p.tail for p in self.parts]
        prefix = Prefix(k=cat([pad(p.k) for p in ps]), v=cat([pad(p.v) for p in ps]),
                        pos=cat([pad(p.pos) for p in ps]), length=cat([p.length for p in ps]))
        tail = dataclasses.replace(ts[0], k=cat([t.k for t in ts]), v=cat([t.v for t in ts]))
        return LayerCache(prefix=prefix, tail=tail)


def query_heads(kv_heads: tuple[int, ...], group_size: int) -> np.ndarray:
    """Query-head ids served by `kv_heads` (query heads of a kv head are contiguous)."""
    return np.concatenate([np.arange(h * group_size, (h + 1) * group_size) for h in kv_heads])


def merge_heads(outs: list[jax.Array], heads, group_size: int) -> jax.Array:
    """Per-group outputs [B, T, N_g, Hv] -> [B, T, N, Hv] in the original head order."""
    order = np.concatenate([query_heads(h, group_size) for h in heads])
    return jnp.concatenate(outs, axis=2)[:, :, np.argsort(order)]


def take_heads(layer: LayerCache, heads: tuple[int, ...]) -> LayerCache:
    """The kv heads `heads` of a dense layer (prefix and tail)."""
    idx = np.asarray(heads)
    p, t = layer.prefix, layer.tail
    pick = lambda x: None if x is None else x[:, idx]
    prefix = dataclasses.replace(p, k=p.k[:, idx], v=p.v[:, idx], pos=p.pos[:, idx],
                                 length=p.length[:, idx], channels=pick(p.channels),
                                 value_channels=pick(p.value_channels))
    return LayerCache(prefix=prefix, tail=dataclasses.replace(t, k=t.k[:, idx], v=t.v[:, idx]))


def valid_rows(rows: jax.Array, length: jax.Array) -> jax.Array:
    """Zero the window rows [B, K, G, W, C] at slots >= length [B, K] (padding)."""
    ok = jnp.arange(rows.shape[-1])[None, None, :] < length[..., None]
    return jnp.where(ok[:, :, None, None], rows, 0.0)


def ring_step(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, active: jax.Array,
              prefix: Prefix, rows: jax.Array, *, window: int, kernel_size: int, pooling: str,
              scale: float, sliding_window: int | None) -> tuple[jax.Array, Prefix, jax.Array]:
    """One new token through a ring-mode group.

    Args:
      q: [B, K_g, G, H] post-RoPE query; k, v: [B, K_g, H] its key and value; pos: [B] its
        position; active: [B] bool (inactive rows leave the group unchanged).
      prefix: k, v [B, K_g, C, H], pos [B, K_g, C], length [B, K_g]; rows [B, K_g, G, W, C].

    Returns:
      out [B, K_g, G, Hv] (attention over the old slots and the token itself, one softmax),
      the re-selected prefix (C slots) and rows.
    """
    c = prefix.capacity
    slot = jnp.arange(c + 1)
    at_new = slot[None, None, :] == prefix.length[..., None]  # [B, K_g, C+1]
    grow = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :, :1])], axis=2)
    ck = jnp.where(at_new[..., None], k[:, :, None], grow(prefix.k))
    cv = jnp.where(at_new[..., None], v[:, :, None], grow(prefix.v))
    cpos = jnp.where(at_new, pos[:, None, None], grow(prefix.pos))
    count = prefix.length + 1
    valid = slot[None, None, :] < count[..., None]
    seen = valid if sliding_window is None else valid & (
        pos[:, None, None] - cpos < sliding_window)
    logits = jnp.einsum("bkgh,bksh->bkgs", q, ck, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(seen[:, :, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(seen[:, :, None], p, 0.0)  # [B, K_g, G, C+1]
    out = jnp.einsum("bkgs,bksh->bkgh", p, cv.astype(jnp.float32)).astype(q.dtype)
    old_rows = jnp.pad(rows[:, :, :, 1:], ((0, 0),) * 4 + ((0, 1),))  # oldest row leaves
    new_rows = jnp.concatenate([old_rows, p[:, :, :, None]], axis=3)  # [B, K_g, G, W, C+1]
    recent = valid & (slot[None, None, :] >= count[..., None] - window)
    score = jnp.where(recent[:, :, None], 0.0, new_rows.mean(axis=3))
    score = pool1d(score, kernel_size, pooling).mean(axis=2)
    score = jnp.where(recent, jnp.inf, jnp.where(valid, score, -jnp.inf))
    n_keep = jnp.minimum(count, c)
    idx, length = kept_indices(topk_mask(score, n_keep, c), c)  # [B, K_g, C]
    kept = Prefix(k=gather_slots(ck, idx), v=gather_slots(cv, idx),
                  pos=jnp.take_along_axis(cpos, idx, axis=2), length=length)
    kept_rows = valid_rows(jnp.take_along_axis(new_rows, idx[:, :, None, None, :], axis=4),
                           length)
    keep_old = lambda new, old: jnp.where(
        active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    prefix = jax.tree_util.tree_map(keep_old, kept, prefix)
    return out, prefix, keep_old(kept_rows, rows)


def ring_decode(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                n_new: jax.Array, part: LayerCache, rows: jax.Array, *, kernel_size: int,
                pooling: str, scale: float | None,
                sliding_window: int | None) -> tuple[jax.Array, LayerCache, jax.Array]:
    """T new tokens through a ring-mode group, one at a time (`lax.scan`).

    Args:
      q: [B, T, N_g, H]; k, v: [B, T, K_g, H]; positions: [B, T]; n_new: [B] real tokens
      (right padding beyond is skipped); part: the group's LayerCache; rows [B, K_g, G, W, C].

    Returns:
      out [B, T, N_g, Hv], the updated part and rows.
    """
    b, t, n_g, h = q.shape
    k_g = k.shape[2]
    scale = default_scale(h) if scale is None else scale
    step = lambda qt, kt, vt, pt, act, prefix, r: ring_step(
        qt, kt, vt, pt, act, prefix, r, window=rows.shape[3], kernel_size=kernel_size,
        pooling=pooling, scale=scale, sliding_window=sliding_window)

    def body(carry, xs):
        qt, kt, vt, pt, i = xs
        out, prefix, r = step(qt, kt, vt, pt, i < n_new, *carry)
        return (prefix, r), out

    xs = (q.reshape(b, t, k_g, n_g // k_g, h).swapaxes(0, 1), k.swapaxes(0, 1),
          v.swapaxes(0, 1), positions.T, jnp.arange(t))
    (prefix, rows), outs = jax.lax.scan(body, (part.prefix, rows), xs)
    out = outs.swapaxes(0, 1).reshape(b, t, n_g, outs.shape[-1])
    return out, dataclasses.replace(part, prefix=prefix), rows


def decode_grouped(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                   n_new: jax.Array, layer: GroupedLayerCache, *, dense_decode,
                   scale: float | None,
                   sliding_window: int | None) -> tuple[jax.Array, GroupedLayerCache]:
    """`decode_layer` for a grouped layer: every group attends over its own cache.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; positions [B, T]; n_new [B].
      dense_decode: (q, k, v, positions, n_new, LayerCache) -> (out, LayerCache), the dense
        decode of tail mode (kvjax.decode_layer with the caller's options).
    """
    g = q.shape[2] // layer.n_kv_heads
    outs, parts, rows = [], [], []
    for i, (heads, part) in enumerate(zip(layer.heads, layer.parts)):
        qi, ki = query_heads(heads, g), np.asarray(heads)
        args = (q[:, :, qi], k[:, :, ki], v[:, :, ki], positions, n_new, part)
        if layer.ring:
            out, part, r = ring_decode(*args, layer.rows[i], kernel_size=layer.kernel_size,
                                       pooling=layer.pooling, scale=scale,
                                       sliding_window=sliding_window)
            rows.append(r)
        else:
            out, part = dense_decode(*args)
        outs.append(out)
        parts.append(part)
    return merge_heads(outs, layer.heads, g), dataclasses.replace(
        layer, parts=tuple(parts), rows=tuple(rows) if layer.ring else None)
