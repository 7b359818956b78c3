"""Decode-time hooks: the protocol the loop and `decode_layer` call while tokens are generated.

This module is below the presses (it imports only the cache and the observation spec); the
hooks themselves live with the presses that bring them:
  * `DecodingPress` (kvjax/presses/decoding.py): tokens go to the tail; every
    `compression_interval` steps `after_step` merges each layer's tail into its segments;
  * `RingDecode` (kvjax/presses/ring.py, UNComp's official decode): no tail; `decode_layer`
    attends over a layer's segment plus the new token and re-selects the segment at once.
Both rewrite segments in place (`kvjax.cache.write_view`), within the room the store gave
every segment (its size, or a growing budget's room: `segment_room`), so they work over every
allocator's table. A hook is a frozen dataclass, static but for its `value_fields`; the cache
carries it (`KVCache.hook`), so models never see it.
"""

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache
from kvjax.observation import ObsSpec
from kvjax.values import register_values


class DecodeHook:
    """Base class: no decode-time compression (tokens accumulate in the tail).

    Every subclass (a frozen dataclass) is a pytree whose leaves are its `value_fields`, also
    inside nested fields (a DecodingPress's budget threshold): the cache carries the hook, so
    a new value of those never recompiles the decode loop (`kvjax.values`)."""

    value_fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_values(cls)

    owns_attention = False  # decode_layer delegates attention to the hook
    needs_extra = False  # the store carries per-slot state (`init_extra`)
    tail_state = False  # the tail carries a score per slot (`Tail.score`)
    scores_hidden = False  # decode_layer hands the new tokens' hidden states to the hook
    needs_out_proj = False  # an attention-owning hook also gets hidden= and out_proj= (W_O)
    attachable = True  # may join a cache compressed without it (`Pipeline.ask`)

    @property
    def obs_spec(self) -> ObsSpec:
        """Prefill observations the hook needs (e.g. the ring's initial rows)."""
        return ObsSpec()

    def check_press(self, press) -> None:
        """Raise ValueError naming both when the hook cannot run over `press`'s cache."""
        if press is not None and press.channel_pruner is not None:
            raise ValueError(f"{type(self).__name__} cannot rewrite the thin keys of "
                             f"{type(press).__name__}: decode-time re-selection needs "
                             "full-width keys")

    def write_hidden_scores(self, cache: KVCache, layer, hidden: jax.Array,
                            positions: jax.Array, start: jax.Array) -> KVCache:
        """Score the new tokens of layer `layer` from hidden [B, T, D] into the tail's
        slots [start, start + T) (only hooks with `scores_hidden`)."""
        return cache

    def segment_room(self, width: int, seen_bound: int) -> int | None:
        """Static slots every segment needs when the hook grows segments past `width` (what
        the prefill keeps at most) for up to `seen_bound` tokens; None: no growth."""
        return None

    def tail_slots(self, out_len: int, reserved: int) -> int:
        """Tail capacity for `out_len` generated tokens and `reserved` appended ones."""
        return out_len

    def room(self, cache: KVCache) -> jax.Array:
        """[] bool: one more token fits."""
        return jnp.max(cache.tail.count) < cache.tail.capacity

    def after_step(self, cache: KVCache) -> KVCache:
        """Called by the decode loop after every generated token."""
        return cache


def hook_or_default(hook: DecodeHook | None) -> DecodeHook:
    """The hook a cache decodes with: its own, or the plain tail (`DecodeHook()`)."""
    return DecodeHook() if hook is None else hook

