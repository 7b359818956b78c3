"""UNComp's ring decode (arXiv 2410.03090): a decode hook over any allocator's segments.

The hook protocol is `kvjax.hooks.DecodeHook`; `UNCompPress(decode="ring")` brings this hook
(kvjax/presses/uncomp.py).
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale
from kvjax.cache import LayerView, gather_rows, layer_view, slot_index, write_view
from kvjax.hooks import DecodeHook
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.parts import check_fields
from kvjax.presses.window import check_window_args, pool1d, window_attention


@dataclasses.dataclass(frozen=True)
class RingDecode(DecodeHook):
    """UNComp's official decode (arXiv 2410.03090) over any allocator's segments.

    No tail: each (layer, kv head) segment holds exactly its budget. A new token enters the
    candidates, its attention row (each query head of the group) joins a ring of the last
    `window_size` rows, and the segment re-selects SnapKV-style: the most recent
    `window_size` slots always, the rest by the rows' mean attention pooled along the slots
    (`kernel_size`, `pooling`), averaged over the group. Static shapes, one compilation.
    """

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self):
        check_fields(self)
        check_window_args(self)

    owns_attention = True
    needs_extra = True

    @property
    def obs_spec(self):
        return ObsSpec(window=self.window_size)

    def tail_slots(self, out_len, reserved):
        return 0

    def room(self, cache):
        return jnp.bool_(True)

    def init_extra(self, full: LayerView, obs, idx: jax.Array, length: jax.Array, ctx):
        """Initial rows [B, K, M, G * W]: the last W prompt queries' attention (over the whole
        prompt) to the kept slots idx [B, K, M]."""
        probs = window_attention(full, obs, ctx.prompt_len, self.window_size)  # [B,K,G,W,C]
        rows = jnp.take_along_axis(probs, idx[:, :, None, None, :], axis=4)
        rows = valid_rows(rows, length)  # [B, K, G, W, M]
        b, k, g, w, m = rows.shape
        return rows.transpose(0, 1, 4, 2, 3).reshape(b, k, m, g * w)

    def decode_layer(self, q, k, v, positions, n_new, cache, layer, *, sliding_window=None,
                     scale=None):
        """T new tokens of layer `layer` through the ring, one at a time (`lax.scan`).

        Returns out [B, T, N, H] and the cache with the layer's segments rewritten.
        """
        store = cache.store
        view = layer_view(store, layer)
        b, t, n, h = q.shape
        n_kv, m = view.k.shape[1], view.capacity
        g = n // n_kv
        extra = gather_rows(store.extra, slot_index(store, layer, m)[0])  # [B, K, M, G*W]
        rows = valid_rows(extra.reshape(b, n_kv, m, g, self.window_size).transpose(0, 1, 3, 4, 2),
                          view.length)  # slots past a segment hold other segments' state
        scale = default_scale(h) if scale is None else scale

        def body(carry, xs):
            qt, kt, vt, pt, i = xs
            out, view, r = ring_step(qt, kt, vt, pt, i < n_new, *carry, window=self.window_size,
                                     kernel_size=self.kernel_size, pooling=self.pooling,
                                     scale=scale, sliding_window=sliding_window)
            return (view, r), out

        xs = (q.reshape(b, t, n_kv, g, h).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
              positions.T, jnp.arange(t))
        (view, rows), outs = jax.lax.scan(body, (view, rows), xs)
        extra = rows.transpose(0, 1, 4, 2, 3).reshape(b, n_kv, m, g * self.window_size)
        store = write_view(store, layer, view, extra)
        out = outs.swapaxes(0, 1).reshape(b, t, n, outs.shape[-1])
        return out, dataclasses.replace(cache, store=store)


def valid_rows(rows: jax.Array, length: jax.Array) -> jax.Array:
    """Zero the window rows [B, K, G, W, C] at slots >= length [B, K] (padding)."""
    ok = jnp.arange(rows.shape[-1])[None, None, :] < length[..., None]
    return jnp.where(ok[:, :, None, None], rows, 0.0)


def ring_step(q, k, v, pos, active, view: LayerView, rows, *, window: int, kernel_size: int,
              pooling: str, scale: float, sliding_window: int | None):
    """One new token through one layer's segments.

    Args:
      q: [B, K, G, H] post-RoPE query; k, v: [B, K, H] its key and value; pos: [B] its
        position; active: [B] bool (inactive rows leave the segments unchanged).
      view: the layer's segments (k, v [B, K, M, H], pos, length [B, K]); rows
        [B, K, G, W, M] the ring of the last W queries' attention over the slots.

    Returns:
      out [B, K, G, Hv] (attention over the old slots and the token itself, one softmax), the
      re-selected view (each segment keeps its length) and rows.
    """
    c = view.capacity
    slot = jnp.arange(c + 1)
    at_new = slot[None, None, :] == view.length[..., None]  # [B, K, M+1]
    grow = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :, :1])], axis=2)
    ck = jnp.where(at_new[..., None], k[:, :, None], grow(view.k))
    cv = jnp.where(at_new[..., None], v[:, :, None], grow(view.v))
    cpos = jnp.where(at_new, pos[:, None, None], grow(view.pos))
    count = view.length + 1
    valid = slot[None, None, :] < count[..., None]
    seen = valid if sliding_window is None else valid & (
        pos[:, None, None] - cpos < sliding_window)
    logits = jnp.einsum("bkgh,bksh->bkgs", q, ck, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(seen[:, :, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(seen[:, :, None], p, 0.0)  # [B, K, G, M+1]
    out = jnp.einsum("bkgs,bksh->bkgh", p, cv.astype(jnp.float32)).astype(q.dtype)
    old_rows = jnp.pad(rows[:, :, :, 1:], ((0, 0),) * 4 + ((0, 1),))  # oldest row leaves
    new_rows = jnp.concatenate([old_rows, p[:, :, :, None]], axis=3)  # [B, K, G, W, M+1]
    recent = valid & (slot[None, None, :] >= count[..., None] - window)
    score = jnp.where(recent[:, :, None], 0.0, new_rows.mean(axis=3))
    score = pool1d(score, kernel_size, pooling).mean(axis=2)  # attention: within [0, 1]
    # recent slots above every score, newer above older (a segment shorter than the window
    # keeps its most recent entries)
    recent_rank = 2.0 + slot[None, None, :] / (c + 1.0)
    score = jnp.where(recent, recent_rank, jnp.where(valid, score, -jnp.inf))
    idx, length = select.kept_indices(select.topk_mask(score, view.length, c), c)  # [B, K, M]
    kept = dataclasses.replace(view, k=select.gather_slots(ck, idx),
                               v=select.gather_slots(cv, idx),
                               pos=jnp.take_along_axis(cpos, idx, axis=2), length=length)
    kept_rows = valid_rows(jnp.take_along_axis(new_rows, idx[:, :, None, None, :], axis=4),
                           length)
    keep_old = lambda new, old: jnp.where(
        active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    view = jax.tree_util.tree_map(keep_old, kept, view)
    return out, view, keep_old(kept_rows, rows)
