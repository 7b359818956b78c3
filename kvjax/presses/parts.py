"""Press parts: static sizes, allocators, selectors, and the stage that binds them.

An allocator answers "how many slots does every layer and kv head keep?" with budgets
[B, L, K] (data, so per-input budgets never recompile) and static bounds (`StaticSize`)
that size the store. A selector answers "which slots?" given scores and budgets. Axis
letters: B batch, L layers, K kv heads, C slots of a layer's view.
"""

import abc
import dataclasses
import math
import numbers
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.presses import select


def _kinds(hint) -> set:
    """The plain types a field annotation allows: int | None -> {int, NoneType}."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set(typing.get_args(hint))
    return {hint}


def check_fields(obj) -> None:
    """Raise ValueError on a dataclass field whose value does not match its annotation.

    Fields annotated `int` take an integer (not a bool or a float) >= 0 (a field named `seed`
    any integer), `float` a finite real number (not a bool), `bool` a bool; `X | None` also
    takes None. Range checks beyond these are the class's own. Called first in every press's
    and hook's `__post_init__`, so a bad value never reaches jit.
    """
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, kinds = getattr(obj, field.name), _kinds(hints.get(field.name))
        if field.name in getattr(type(obj), "value_fields", ()) and isinstance(
                value, jax.core.Tracer):  # a value traced inside jit, checked when built
            continue
        where = f"{type(obj).__name__}({field.name}={value!r})"
        if value is None and type(None) in kinds:
            continue
        plain = kinds - {type(None)}
        if plain == {int}:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{where}: {field.name} must be an int")
            if value < 0 and field.name != "seed":
                raise ValueError(f"{where}: {field.name} must be >= 0")
        elif plain in ({float}, {int, float}):
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise ValueError(f"{where}: {field.name} must be a finite number")
        elif plain == {bool} and not isinstance(value, bool):
            raise ValueError(f"{where}: {field.name} must be True or False")
        elif plain == {str} and not isinstance(value, str):
            raise ValueError(f"{where}: {field.name} must be a string")


def validate_ratio(compression_ratio: float) -> None:
    if not isinstance(compression_ratio, (int, float)) or not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"{compression_ratio=} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class StaticSize:
    """Static bounds of a selection.

    Attributes:
      segments: per layer, the largest number of entries one kv head can hold.
      total: the largest number of entries one sequence holds over all layers and kv heads.
    """

    segments: tuple[int, ...]
    total: int

    @classmethod
    def prompt(cls, slots: tuple[int, ...], n_kv: int) -> "StaticSize":
        """The uncompressed prompt: `slots[l]` tokens in layer l, every kv head."""
        return cls(segments=tuple(slots), total=n_kv * sum(slots))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One token stage: a scorer, an allocator and a selector (all static)."""

    scorer: object
    allocator: "Allocator"
    selector: "Selector"


class Allocator(abc.ABC):
    """Budgets per layer and kv head. Frozen dataclasses (static jit arguments)."""

    def layer_stat(self, view, obs, scores: jax.Array, ctx):
        """A per-layer statistic the budgets need (mapped over layers), or None."""
        return None

    @abc.abstractmethod
    def budgets(self, n_valid: jax.Array, stats, prompt_len: jax.Array) -> jax.Array:
        """Budgets [B, L, K] int32 in [0, n_valid] from valid counts n_valid [B, L, K] and the
        stacked per-layer statistics; prompt_len [B] original prompt lengths."""

    @abc.abstractmethod
    def capacity(self, size: StaticSize, n_kv: int) -> StaticSize:
        """Static bounds after this allocator, from the bounds before it."""


class LayerwiseAllocator(Allocator):
    """An allocator whose budgets for a layer depend only on that layer (uniform, PyramidKV,
    UNComp): `layer_budgets` is vectorised over the layers."""

    @abc.abstractmethod
    def layer_budgets(self, n_valid: jax.Array, layer_idx, n_layers: int) -> jax.Array:
        """Budgets [B, K] for valid counts n_valid [B, K] of layer `layer_idx` (traced)."""

    def budgets(self, n_valid, stats, prompt_len):
        n_layers = n_valid.shape[1]
        per_layer = jax.vmap(lambda n, l: self.layer_budgets(n, l, n_layers),
                             in_axes=(1, 0), out_axes=1)
        return per_layer(n_valid, jnp.arange(n_layers))


@dataclasses.dataclass(frozen=True)
class Uniform(LayerwiseAllocator):
    """Every layer and kv head keeps ceil((1 - r) n) of its n valid slots (at least 1)."""

    compression_ratio: float = 0.0

    def layer_budgets(self, n_valid, layer_idx, n_layers):
        return jnp.minimum(select.ceil_keep(n_valid, self.compression_ratio), n_valid)

    def capacity(self, size, n_kv):
        segs = tuple(select.ceil_keep_static(s, self.compression_ratio) for s in size.segments)
        # each (layer, head) rounds up by less than one slot
        rounded = math.ceil(round((1.0 - self.compression_ratio) * size.total, 6))
        return StaticSize(segs, min(n_kv * sum(segs), rounded + n_kv * len(segs)))


class Selector(abc.ABC):
    """Which slots are kept. Frozen dataclasses (static jit arguments)."""

    @abc.abstractmethod
    def select(self, scores: jax.Array, n_keep: jax.Array, view, obs, ctx,
               capacity: int) -> jax.Array:
        """Keep mask [B, K, C] with exactly n_keep [B, K] slots per row, from scores [B, K, C]
        (-inf on invalid slots); `capacity` bounds n_keep (static)."""


@dataclasses.dataclass(frozen=True)
class TopK(Selector):
    """The n_keep best-scored slots (ties to the earlier slot)."""

    def select(self, scores, n_keep, view, obs, ctx, capacity):
        return select.topk_mask(scores, n_keep, capacity)


def static_budget_max(fn, n_max: int) -> int:
    """max over n in 1..n_max of a numpy budget rule fn(n array) (a static capacity)."""
    return int(min(n_max, max(1, np.max(fn(np.arange(1, n_max + 1))))))
