"""Value fields (kvjax/values.py): a press or hook is a pytree whose only leaves are its
thresholds, found through nested budgets and press tuples; equal skeletons for different
values (one jit cache entry); the values come back in order; every other field stays static
and still refused when it is an array."""

import jax
import jax.numpy as jnp
import pytest

import kvjax
from kvjax.kvzap import UntrainedWeights
from kvjax.values import join_values, split_values


def _threshold(t, **kw):
    return kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=UntrainedWeights()), threshold=t,
                                **kw)


@pytest.mark.parametrize("make", [
    lambda t: _threshold(t),
    lambda t: _threshold(t, decoding=True, compression_interval=8).decode_hook,
    lambda t: kvjax.ComposedPress(presses=(_threshold(t),
                                           kvjax.KnormPress(compression_ratio=0.5))),
], ids=["threshold_press", "decoding_hook", "composed"])
def test_leaves_are_the_thresholds_and_the_rest_is_static(make):
    a, b = make(-4.0), make(-2.5)
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert leaves_a == [-4.0] and leaves_b == [-2.5]
    assert tree_a == tree_b and hash(tree_a) == hash(tree_b)  # one compilation for both
    assert jax.tree_util.tree_unflatten(tree_a, leaves_b) == b
    skeleton, values = split_values(a)
    assert values == [-4.0] and join_values(skeleton, values) == a


def test_static_fields_key_the_structure():
    a, b = _threshold(-4.0), _threshold(-4.0, decoding=True)
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b)


def test_presses_without_values_have_no_leaves():
    for press in (kvjax.SnapKVPress(compression_ratio=0.5), kvjax.DecodingPress(
            press=kvjax.KnormPress(), compression_interval=8, budget=kvjax.FixedSize(40))):
        leaves, tree = jax.tree_util.tree_flatten(press)
        assert leaves == [] and jax.tree_util.tree_unflatten(tree, []) == press


def test_a_traced_threshold_reaches_the_budget():
    hook = _threshold(-4.0, decoding=True, compression_interval=8).decode_hook
    seen = jax.jit(lambda h: h.budget.threshold * 2)(hook)
    assert float(seen) == -8.0


@pytest.mark.parametrize("make, says", [
    (lambda: kvjax.StreamingLLMPress(compression_ratio=0.5, n_sink=jnp.int32(4)),
     "must be an int"),
    (lambda: kvjax.FixedSize(jnp.float32(20.5)), "must be an int"),
    (lambda: kvjax.ScoreThreshold(jnp.array([1.0, 2.0])), "finite number"),
    (lambda: kvjax.ScoreThreshold(float("nan")), "finite number"),
])
def test_arrays_are_refused_outside_jit(make, says):
    with pytest.raises(ValueError, match=says):
        make()
