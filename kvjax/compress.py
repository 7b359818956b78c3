"""From a prefill to a cache: run a press's parts over every layer and write the store.

Pure and jit-friendly: per stage, the scorer (and the allocator's per-layer statistic) is
mapped over the stacked layers (`lax.map`: one compiled body whatever the depth), the
allocator turns valid counts into budgets [B, L, K], the selector picks slots and the views
shrink to the stage's static bound. A channel pruner (ThinK) thins the result, a decode hook
may attach per-slot state, and `kvjax.writer.write_store` packs everything into the store.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, LayerView, init_tail, quantize_store
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, check_press_arg
from kvjax.presses.parts import StaticSize
from kvjax.prompt import Prompt
from kvjax.writer import Selection, aligned_slots, write_store


def obs_spec_for(press, hook=None) -> ObsSpec:
    """What the press (None: the full cache) and the decode hook need observed."""
    spec = ObsSpec() if press is None else press.obs_spec
    return spec if hook is None else spec.merge(hook.obs_spec)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [L, B, K, C, ...] gathered along C by idx [L, B, K, M] -> [L, B, K, M, ...]."""
    return jax.vmap(select.gather_slots)(x, idx)


def _shrink(view: LayerView, idx: jax.Array, length: jax.Array) -> LayerView:
    """The stacked view's slots idx [L, B, K, M], with new valid counts length [L, B, K]."""
    return LayerView(k=_take(view.k, idx), v=_take(view.v, idx),
                     pos=_take(view.pos, idx), length=length)


class _Group:
    """One prompt group while it is compressed: its views, observations, layer ids, and the
    indices of the current slots in the group's original tokens."""

    def __init__(self, group, first_layer: int):
        self.view = group.views()
        self.full = self.view
        self.obs = group.layers.obs
        self.layers = jnp.arange(first_layer, first_layer + group.n_layers, dtype=jnp.int32)
        n_layers, b, n_kv, t = self.view.pos.shape
        self.idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n_layers, b, n_kv, t))

    @property
    def width(self) -> int:
        return self.view.capacity


def _run_stage(stage, groups, size: StaticSize, prompt_len, n_layers: int) -> StaticSize:
    """Score, budget and select every layer of every group (groups are updated in place)."""
    ctx = lambda l: LayerContext(prompt_len=prompt_len, layer_idx=l, n_layers=n_layers)

    def score_one(args):
        view, obs, l = args
        s = select.mask_invalid(stage.scorer.score(view, obs, ctx(l)), view.length)
        return s, stage.allocator.layer_stat(view, obs, s, ctx(l))

    scored = [jax.lax.map(score_one, (g.view, g.obs, g.layers)) for g in groups]
    n_valid = jnp.concatenate([g.view.length for g in groups], axis=0).transpose(1, 0, 2)
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[s for _, s in scored])
    budgets = stage.allocator.budgets(n_valid, stats, prompt_len)  # [B, L, K]
    new_size = stage.allocator.capacity(size, n_valid.shape[2])
    first = 0
    for g, (scores, _) in zip(groups, scored):
        n_g = g.layers.shape[0]
        width = min(g.width, max(new_size.segments[first:first + n_g]))

        def select_one(args, width=width):
            view, obs, l, s, n = args
            mask = stage.selector.select(s, n, view, obs, ctx(l), width)
            return select.kept_indices(mask, width)

        idx, length = jax.lax.map(select_one, (g.view, g.obs, g.layers, scores,
                                               budgets[:, first:first + n_g].swapaxes(0, 1)))
        g.view, g.idx = _shrink(g.view, idx, length), _take(g.idx, idx)
        first += n_g
    return new_size


def _prune_channels(pruner, groups, prompt_len, n_layers):
    """Apply a channel pruner per layer -> the recent window it moves to the tail."""
    recent = []
    for g in groups:
        def one(args):
            view, full, obs, l = args
            return pruner.prune_layer(view, full, obs, LayerContext(prompt_len, l, n_layers))

        g.view, rk, rv, rpos = jax.lax.map(one, (g.view, g.full, g.obs, g.layers))
        recent.append((rk, rv, rpos[0]))
    rk, rv, rpos = (jnp.concatenate([r[0] for r in recent]), jnp.concatenate(
        [r[1] for r in recent]), recent[0][2])
    return rk, rv, rpos


def _hook_extra(hook, groups, prompt_len, n_layers):
    """Per-slot hook state [L, B, K, M_g, E] per group, or None."""
    if hook is None or not hook.needs_extra:
        return [None] * len(groups)
    out = []
    for g in groups:
        def one(args):
            full, obs, idx, length, l = args
            return hook.init_extra(full, obs, idx, length, LayerContext(prompt_len, l, n_layers))

        out.append(jax.lax.map(one, (g.full, g.obs, g.idx, g.view.length, g.layers)))
    return out


def _stack(groups, extras) -> Selection:
    """Concatenate the groups' views over layers, padding their slot axes to one width."""
    m = max(g.width for g in groups)

    def cat(xs, per_slot=True):  # per-slot arrays [L, B, K, M_g, ...] are padded to m
        if xs[0] is None:
            return None
        pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, m - x.shape[3])] + [(0, 0)] * (
            x.ndim - 4))
        return jnp.concatenate([pad(x) if per_slot else x for x in xs], axis=0)

    views = [g.view for g in groups]
    return Selection(k=cat([v.k for v in views]), v=cat([v.v for v in views]),
                     pos=cat([v.pos for v in views]),
                     length=cat([v.length for v in views], per_slot=False),
                     channels=cat([v.channels for v in views], per_slot=False),
                     value_channels=cat([v.value_channels for v in views], per_slot=False),
                     extra=cat(extras))


def compress(press, prompt: Prompt, *, tail_capacity: int, hook=None, quant=None,
             rows: int = 1, decode_len: int = 0) -> KVCache:
    """Compress a prefill with `press` (None keeps every entry) into a KVCache.

    Args:
      press: a Press or None; prompt: the model's prefill output (`kvjax.prompt.Prompt`).
      tail_capacity: static tail slots for tokens appended later (a channel pruner adds the
        recent window it moves to the tail).
      hook: the decode hook the cache carries (`kvjax.hooks`), or None.
      quant: a `kvjax.quant.KVQuant` to store the kept entries quantized (after selection:
        the press scored full-precision keys), or None.
      rows: store rows R (dividing K): the mesh's "model" size when the store is sharded
        over it (`kvjax.sharding`), so every row holds the segments of one device's heads.
      decode_len: tokens the request may generate (the plan's buffer), for a decode hook
        whose budget grows segments (`DecodeHook.segment_room`); 0 otherwise.

    Returns:
      KVCache whose store holds exactly the kept entries (plus alignment).
    """
    check_press_arg(press)
    groups, first = [], 0
    for group in prompt.groups:
        groups.append(_Group(group, first))
        first += group.n_layers
    n_layers, (_, b, n_kv, _, h) = first, groups[0].view.k.shape
    size = StaticSize.prompt(tuple(g.width for g in groups for _ in range(g.layers.shape[0])),
                             n_kv)
    for stage in (() if press is None else press.stages()):
        size = _run_stage(stage, groups, size, prompt.next_pos, n_layers)
    pruner = None if press is None else press.channel_pruner
    recent = None if pruner is None else _prune_channels(pruner, groups, prompt.next_pos,
                                                         n_layers)
    if pruner is not None:
        size = pruner.pruned_size(size, n_kv, press.kept_recent)
    extras = _hook_extra(hook, groups, prompt.next_pos, n_layers)
    multiple = 1 if quant is None else quant.slot_multiple
    per_row = min(size.total, n_kv // rows * sum(size.segments))  # static bound of one row
    width = max(1, min(max(size.segments), max(g.width for g in groups)))
    room = None if hook is None else hook.segment_room(
        width, max(g.full.capacity for g in groups) + decode_len)
    if room is not None:  # every segment gets room to grow into
        per_row = n_kv // rows * n_layers * room
    store = write_store(_stack(groups, extras), slots=aligned_slots(per_row, multiple),
                        rows=rows, max_segment=width, room=room)
    if quant is not None:
        store = quantize_store(store, quant)
    reserve = 0 if recent is None else recent[0].shape[3]
    dtype = groups[0].view.k.dtype
    tail = init_tail(n_layers, b, n_kv, tail_capacity + reserve, h, dtype)
    if hook is not None and hook.tail_state:
        tail = dataclasses.replace(tail, score=jnp.zeros(tail.k.shape[:4], jnp.float32))
    if recent is not None:
        tail = _prepend(tail, *recent)
    return KVCache(store=store, tail=tail, next_pos=prompt.next_pos, hook=hook)


def _prepend(tail, rk, rv, rpos):
    """The tail with its first W slots holding the recent window rk, rv [L, B, K, W, H]."""
    w = rk.shape[3]
    return type(tail)(k=tail.k.at[:, :, :, :w].set(rk.astype(tail.k.dtype)),
                      v=tail.v.at[:, :, :, :w].set(rv.astype(tail.v.dtype)),
                      pos=tail.pos.at[:, :w].set(rpos.astype(jnp.int32)),
                      count=tail.count + w)


def static_prompt_size(press, slots: tuple[int, ...], n_kv: int) -> StaticSize:
    """Static bounds of what `press` keeps of a prompt of `slots[l]` tokens per layer."""
    size = StaticSize.prompt(slots, n_kv)
    return size if press is None else press.capacity(size, n_kv)


