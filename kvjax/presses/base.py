"""The press protocol: frozen, hashable dataclasses that compress a prefilled cache.

A press is a static jit argument. It never reads the model and never mutates itself: its
only inputs are the layer's `LayerCache`, that layer's `Observation` and a `LayerContext`.
Parts compose (ARCHITECTURE.md section 4): a `ScorerPress` scores tokens per kv head, a
budget rule says how many to keep, `select.topk_mask` picks them and `select.compact`
gathers the kept slots into a smaller static capacity (the real memory saving).
"""

import abc
import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, LayerCache, Prefix
from kvjax.observation import Observation, ObsSpec
from kvjax.presses import select


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a press may know about the layer besides cache and observation.

    Attributes:
      layer_idx, n_layers: static ints.
      prompt_len: [B] original prompt lengths (positions >= prompt_len - W are the window).
    """

    prompt_len: jax.Array
    layer_idx: int = dataclasses.field(metadata=dict(static=True), default=0)
    n_layers: int = dataclasses.field(metadata=dict(static=True), default=1)


def validate_ratio(compression_ratio: float) -> None:
    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"{compression_ratio=} must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Press(abc.ABC):
    """Base class: compress every layer of a freshly prefilled cache."""

    @property
    def obs_spec(self) -> ObsSpec:
        """What this press needs observed during prefill."""
        return ObsSpec()

    def check_prompt(self, min_prompt_len: int) -> None:
        """Raise ValueError when the shortest prompt cannot be compressed by this press."""

    @abc.abstractmethod
    def compress_layer(self, layer: LayerCache, obs: Observation,
                       ctx: LayerContext) -> LayerCache:
        """Return the layer with its prefix compressed (tail untouched)."""

    def compress(self, cache: KVCache, observations) -> KVCache:
        """Apply `compress_layer` to every layer (pure; runs inside the prefill jit)."""
        n = len(cache.layers)
        layers = tuple(
            self.compress_layer(layer, obs, LayerContext(cache.next_pos, i, n))
            for i, (layer, obs) in enumerate(zip(cache.layers, observations)))
        return dataclasses.replace(cache, layers=layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScorerPress(Press):
    """A press that scores prompt tokens per kv head and keeps the top ceil((1-r)·n).

    Subclasses implement `score`; budgets may depend on the layer (`n_keep`, `capacity`).
    """

    compression_ratio: float = 0.0

    def __post_init__(self):
        validate_ratio(self.compression_ratio)

    @abc.abstractmethod
    def score(self, prefix: Prefix, obs: Observation, ctx: LayerContext) -> jax.Array:
        """Return scores [B, K, C] (higher = keep); invalid slots are masked afterwards."""

    def n_keep(self, n_valid: jax.Array, ctx: LayerContext) -> jax.Array:
        """Slots kept per row from valid counts (elementwise; ceil((1-r)·n), at least 1)."""
        return select.ceil_keep(n_valid, self.compression_ratio)

    def capacity(self, n_slots: int, ctx: LayerContext) -> int:
        """Static number of slots after compression for a prefix of `n_slots` slots."""
        return select.ceil_keep_static(n_slots, self.compression_ratio)

    def compress_layer(self, layer, obs, ctx):
        if self.compression_ratio == 0:
            return layer
        p = layer.prefix
        scores = select.mask_invalid(self.score(p, obs, ctx), p.length)
        n_keep = jnp.minimum(self.n_keep(p.length, ctx), p.length)  # [B, K]
        mask = select.topk_mask(scores, n_keep, self.capacity(p.capacity, ctx))
        return dataclasses.replace(layer, prefix=select.compact(p, mask,
                                                               self.capacity(p.capacity, ctx)))
