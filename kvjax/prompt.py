"""What a prefill hands the compressor: every layer's uncompressed keys, values and
observations, stacked over layers (docs/architecture.md section 2).

Layers that saw the same tokens form a `PromptGroup`; without hidden-state pruning (UNComp)
there is one group holding every layer. Axis letters: L layers of the group, B batch,
K kv heads, T tokens of the group, H head dim.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import LayerView
from kvjax.observation import Observation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerPrompt:
    """One layer's prefill output for the cache: k, v [B, K, T, H] (post-RoPE keys) and its
    Observation. A model stacks these over its layers (`lax.scan` outputs)."""

    k: jax.Array
    v: jax.Array
    obs: Observation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptGroup:
    """Consecutive layers that attended over the same tokens.

    Attributes:
      layers: LayerPrompt with leaves stacked over the group's layers (k [L, B, K, T, H]).
      positions: [B, T] int32 original positions of the group's tokens (ascending per row).
      lengths: [B] int32 valid tokens per row (rows >= length are padding).
    """

    layers: LayerPrompt
    positions: jax.Array
    lengths: jax.Array

    @property
    def n_layers(self) -> int:
        return self.layers.k.shape[0]

    def views(self) -> LayerView:
        """The group's tokens as a LayerView stacked over layers (k [L, B, K, T, H])."""
        n_layers, b, n_kv, t, _ = self.layers.k.shape
        pos = jnp.broadcast_to(self.positions[None, :, None, :].astype(jnp.int32),
                               (n_layers, b, n_kv, t))
        length = jnp.broadcast_to(self.lengths[None, :, None].astype(jnp.int32),
                                  (n_layers, b, n_kv))
        return LayerView(k=self.layers.k, v=self.layers.v, pos=pos, length=length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompt:
    """The whole prefill: layer groups in order and the next position of every sequence.

    Attributes:
      groups: PromptGroups covering layers 0 .. L-1 in order.
      next_pos: [B] int32 original prompt lengths (where decoding continues).
    """

    groups: tuple[PromptGroup, ...]
    next_pos: jax.Array

    @property
    def n_layers(self) -> int:
        return sum(g.n_layers for g in self.groups)


def single_group(layers: LayerPrompt | list[LayerPrompt], lengths: jax.Array) -> Prompt:
    """A Prompt whose layers all saw the whole (right-padded) prompt.

    Args:
      layers: the LayerPrompts of every layer, stacked (a scan's output) or as a list (a
        Python loop over layers); lengths: [B] prompt lengths.
    """
    if isinstance(layers, (list, tuple)):
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    b, t = layers.k.shape[1], layers.k.shape[3]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = lengths.astype(jnp.int32)
    return Prompt(groups=(PromptGroup(layers=layers, positions=positions, lengths=lengths),),
                  next_pos=lengths)
