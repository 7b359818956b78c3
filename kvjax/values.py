"""Values that are data: fields of a static press or hook that jit traces instead of keying
its cache on, so a new value never recompiles.

A press or decode hook is a frozen dataclass that jit sees as a pytree whose leaves are the
fields its class names in `value_fields` (for instance `ThresholdPress.threshold`), found
also inside fields holding such objects or tuples of them (`DecodingPress.budget`,
`ComposedPress.presses`); every other field is part of the pytree's static structure, so it
keys the compilation as a static argument would.
A class joins by calling `register_values(cls)` (`Press` and `DecodeHook` do it for every
subclass). A value must not change a static shape: sizes and ratios that size the store stay
static fields; thresholds are values. A press or hook that comes out of a jitted call holds
its values as jax Arrays, so it no longer hashes: build presses from Python numbers.
"""

import copy
import dataclasses

import jax


def _valued(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and hasattr(
        type(obj), "value_fields")


def _with(obj, changes: dict):
    """A copy of the frozen dataclass `obj` with `changes` set, without re-running its
    checks (the values were checked when `obj` was built)."""
    if not changes:
        return obj
    new = copy.copy(obj)
    for name, value in changes.items():
        object.__setattr__(new, name, value)
    return new


def _nested(v, walk):
    """walk(v) for a valued object, element-wise for a tuple of them; v itself if unchanged."""
    if _valued(v):
        return walk(v)
    if isinstance(v, tuple) and any(_valued(x) for x in v):
        new = tuple(walk(x) if _valued(x) else x for x in v)
        return v if all(a is b for a, b in zip(new, v)) else new
    return v


def split_values(obj) -> tuple[object, list]:
    """(skeleton, values): `obj` with every value field set to None (recursively), and the
    values in a fixed order (the class's `value_fields`, then nested objects by field)."""
    values = []

    def walk(o):
        changes = {}
        for name in type(o).value_fields:
            values.append(getattr(o, name))
            changes[name] = None
        for f in dataclasses.fields(o):
            v = getattr(o, f.name)
            if f.name not in changes and (inner := _nested(v, walk)) is not v:
                changes[f.name] = inner
        return _with(o, changes)

    return walk(obj), values


def join_values(skeleton, values):
    """The inverse of `split_values`: the skeleton with its value fields filled in order."""
    it = iter(values)

    def walk(o):
        changes = {name: next(it) for name in type(o).value_fields}
        for f in dataclasses.fields(o):
            v = getattr(o, f.name)
            if f.name not in changes and (inner := _nested(v, walk)) is not v:
                changes[f.name] = inner
        return _with(o, changes)

    return walk(skeleton)


def register_values(cls) -> None:
    """Make `cls` a pytree: leaves its value fields, static structure the rest."""
    jax.tree_util.register_pytree_node(
        cls, lambda obj: tuple(reversed(split_values(obj))),
        lambda skeleton, values: join_values(skeleton, values))
