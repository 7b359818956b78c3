"""The engine's one jitted decode step over every slot of the pool.

A slot that is not running takes part with `n_new = 0`: its position, tail and outputs do
not move, so requests come and go without changing a shape (one compilation for a fixed
`max_running`, pool size, tail size and set of samplers).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache
from kvjax.sampling import sample_family
from kvjax.sharding import constrain_cache, mesh_context, mesh_of


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot decode state (donated between steps).

    Attributes:
      logits: [S, V] f32 logits of each slot's next token; rng: [S] PRNG keys (each slot
      splits its own key once per token, as `kvjax.generate` does for one sequence);
      cache: the pool (`kvjax.engine.pool`).
    """

    logits: jax.Array
    rng: jax.Array
    cache: KVCache


def sample_slots(logits, keys, sampler_idx, values, samplers: tuple) -> jax.Array:
    """[S] tokens: slot s sampled by the family `samplers[sampler_idx[s]]` with its values
    `values[s]` ([S, MAX_TRACED] f32: temperature, top-p) from its own logits and key,
    exactly as that sampler draws for a batch of one (`kvjax.sampling.sampler_family`)."""
    one = lambda fam: jax.vmap(lambda lg, k, v: sample_family(fam, lg[None], k, v)[0])(
        logits, keys, values)
    toks = jnp.stack([one(s) for s in samplers])  # [n_families, S]
    return jnp.take_along_axis(toks, sampler_idx[None, :], axis=0)[0]


def gather_slots(state: SlotState, idx) -> SlotState:
    """The slots `idx` [b] of the state as a state of b slots (the pool's store shared)."""
    c = state.cache
    st = dataclasses.replace(c.store, offset=c.store.offset[idx], length=c.store.length[idx])
    t = c.tail
    tail = type(t)(k=t.k[:, idx], v=t.v[:, idx], pos=t.pos[idx], count=t.count[idx])
    return SlotState(logits=state.logits[idx], rng=state.rng[idx],
                     cache=KVCache(store=st, tail=tail, next_pos=c.next_pos[idx]))


def scatter_slots(state: SlotState, idx, sub: SlotState) -> SlotState:
    """`state` with slots `idx` replaced by `sub`'s (decode writes only tails, positions,
    logits and keys; the store and its table are unchanged)."""
    c, t, n = state.cache, state.cache.tail, sub.cache.tail
    tail = type(t)(k=t.k.at[:, idx].set(n.k), v=t.v.at[:, idx].set(n.v),
                   pos=t.pos.at[idx].set(n.pos), count=t.count.at[idx].set(n.count))
    keys = jax.random.key_data(state.rng).at[idx].set(jax.random.key_data(sub.rng))
    return SlotState(logits=state.logits.at[idx].set(sub.logits),
                     rng=jax.random.wrap_key_data(keys),
                     cache=KVCache(store=c.store, tail=tail,
                                   next_pos=c.next_pos.at[idx].set(sub.cache.next_pos)))


@functools.partial(jax.jit, static_argnames=("fn", "samplers", "attn_impl", "pad_id"),
                   donate_argnames=("state",))
def decode_slots(fn, params, state: SlotState, idx, active, sampler_idx, sampler_values, *,
                 samplers: tuple, attn_impl: str, pad_id: int = 0):
    """Sample one token for each of the slots `idx` that is active and feed it to the model
    -> (tokens [b], state, finite [b]: each slot's next logits are all finite).

    Only the b = len(idx) slots gathered take part, so the step costs what the running
    requests need: the engine passes the running slots padded to a power of two (padding
    slots are inactive), one compilation per bucket.

    Args:
      idx: [b] int32 slots (distinct); active: [b] bool, the slots that run this step;
      sampler_idx: [b] int32 into `samplers` (sampler families); sampler_values:
        [b, MAX_TRACED] f32, each slot's sampler values.
    """
    sub = gather_slots(state, idx)
    split = jax.vmap(jax.random.split)(sub.rng)  # [b, 2]
    rng, keys = split[:, 0], split[:, 1]
    tok = jnp.where(active, sample_slots(sub.logits, keys, sampler_idx, sampler_values,
                                         samplers), pad_id)
    with mesh_context(mesh_of(fn)):
        logits, cache = fn.decode(params, tok[:, None], active.astype(jnp.int32), sub.cache,
                                  attn_impl=attn_impl)
    cache = constrain_cache(cache, mesh_of(fn))
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    rng = jax.random.wrap_key_data(keep(jax.random.key_data(rng),
                                        jax.random.key_data(sub.rng)))
    new = logits[:, 0].astype(jnp.float32)
    sub = SlotState(logits=keep(new, sub.logits), rng=rng, cache=cache)
    return tok, scatter_slots(state, idx, sub), jnp.all(jnp.isfinite(new), axis=-1)


def bucket_slots(running: list[int], n_slots: int) -> list[int]:
    """The running slots padded with idle ones to the next power of two (at most n_slots)."""
    b = min(n_slots, 1 << max(len(running) - 1, 0).bit_length())
    idle = [s for s in range(n_slots) if s not in set(running)]
    return sorted(running) + idle[:b - len(running)]


@functools.partial(jax.jit, donate_argnames=("state",))
def set_slot(state: SlotState, slot, logits, rng) -> SlotState:
    """The state with slot `slot`'s next-token logits [V] and key set (at admission)."""
    data = jax.random.key_data(state.rng).at[slot].set(jax.random.key_data(rng))
    return SlotState(logits=state.logits.at[slot].set(logits.astype(jnp.float32)),
                     rng=jax.random.wrap_key_data(data), cache=state.cache)
