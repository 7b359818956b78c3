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


@functools.partial(jax.jit, static_argnames=("fn", "samplers", "attn_impl", "pad_id"),
                   donate_argnames=("state",))
def decode_slots(fn, params, state: SlotState, active, sampler_idx, sampler_values, *,
                 samplers: tuple, attn_impl: str, pad_id: int = 0):
    """Sample one token per running slot and feed it to the model
    -> (tokens [S], state, finite [S]: the slot's next logits are all finite).

    Args:
      active: [S] bool, the slots that run this step; sampler_idx: [S] int32 into `samplers`
        (sampler families); sampler_values: [S, MAX_TRACED] f32, each slot's sampler values.
    """
    split = jax.vmap(jax.random.split)(state.rng)  # [S, 2]
    rng, keys = split[:, 0], split[:, 1]
    tok = jnp.where(active, sample_slots(state.logits, keys, sampler_idx, sampler_values,
                                         samplers), pad_id)
    with mesh_context(mesh_of(fn)):
        logits, cache = fn.decode(params, tok[:, None], active.astype(jnp.int32), state.cache,
                                  attn_impl=attn_impl)
    cache = constrain_cache(cache, mesh_of(fn))
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    rng = jax.random.wrap_key_data(keep(jax.random.key_data(rng),
                                        jax.random.key_data(state.rng)))
    new = logits[:, 0].astype(jnp.float32)
    return (tok, SlotState(logits=keep(new, state.logits), rng=rng, cache=cache),
            jnp.all(jnp.isfinite(new), axis=-1))


@functools.partial(jax.jit, donate_argnames=("state",))
def set_slot(state: SlotState, slot, logits, rng) -> SlotState:
    """The state with slot `slot`'s next-token logits [V] and key set (at admission)."""
    data = jax.random.key_data(state.rng).at[slot].set(jax.random.key_data(rng))
    return SlotState(logits=state.logits.at[slot].set(logits.astype(jnp.float32)),
                     rng=jax.random.wrap_key_data(data), cache=state.cache)
