"""UNCompPress budgets (mean = uniform, group ratios), calibration use, bytes, errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.presses.uncomp import UNCompPress, allocate, group_weights
from kvjax.uncomp.calibration import UNCompCalibration, shipped_calibration


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("groups, n_kv", [(2, 2), (2, 3), (3, 6), (4, 8)])
def test_mean_budget_equals_uniform(ratio, groups, n_kv):
    press = UNCompPress(compression_ratio=ratio, groups=groups)
    w = press.head_weights(0, n_kv)
    n = np.arange(20, 300)[:, None].repeat(n_kv, 1)
    b = press.budgets(n, w, np)
    uniform = np.array([math.ceil(round((1 - ratio) * x, 6)) for x in n[:, 0]])
    assert (b.sum(1) == uniform * n_kv).all()
    assert (b >= 1).all() and (b <= n).all()
    assert b.max() <= press.capacity(300, w)
    low, high = b[:, w == w.min()], b[:, w == w.max()]
    big = n[:, 0] >= 200
    np.testing.assert_allclose(high[big].mean() / low[big].mean(), 2.0, rtol=0.05)


def test_group_weights_linear():
    np.testing.assert_allclose(group_weights(4, 2.5), [1.0, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(group_weights(1, 2.0), [1.0])


def test_allocate_caps_and_redistributes():
    b = allocate(np.array([18]), np.array([[10, 10, 10]]), np.array([1.0, 1.0, 4.0]), np)
    assert b.tolist() == [[4, 4, 10]]


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(3))


def _cal(tiny, groups):
    c = tiny.config
    return UNCompCalibration(version=1, model_signature=(3, 6, 3, c.head_dim),
                             head_groups=groups, head_entropy=((0.0,) * 3,) * 3,
                             layer_entropy=(0.0,) * 3, stages=(0,))


def test_calibrated_groups_drive_budgets_and_bytes(tiny):
    groups = (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))
    press = UNCompPress(compression_ratio=0.5, calibration=_cal(tiny, groups))
    fn, params = tiny.kvjax_split()
    toks, lens = loops.pad_prompts([list(range(1, 61))])
    _, cache = loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens), tail_capacity=4,
                             press=press)
    entry = tiny.config.head_dim * 4 * 2
    for li, layer in enumerate(cache.layers):
        (low, high) = groups[li]
        assert layer.heads == (low, high) and not layer.ring
        lo, hi = (np.asarray(p.prefix.length[0]) for p in layer.parts)
        assert lo.sum() + hi.sum() == 3 * 30
        assert hi.tolist() == [46] and lo.max() <= 23  # 90 * (1,1,2) / 4 + leftover
        w = press.head_weights(li, 3)
        assert [p.prefix.capacity for p in layer.parts] == [
            press.group_capacity(64, w, low), press.group_capacity(64, w, high)]
        assert layer.parts[1].prefix.k.shape[1:3] == (1, press.capacity(64, w))
    rep = kvjax.memory_report(cache)
    assert rep.kv_bytes_needed == 3 * 3 * 30 * entry  # valid prefix entries, tail empty
    held = sum(x.nbytes for layer in cache.layers for part in layer.parts
               for x in (part.prefix.k, part.prefix.v, part.tail.k, part.tail.v))
    assert rep.kv_bytes_held == held
    slots = [sum(len(h) * p.prefix.capacity for h, p in zip(layer.heads, layer.parts))
             for layer in cache.layers]
    assert held == (sum(slots) + 3 * 3 * 4) * entry  # group arrays + 4-slot tails
    dense = [3 * press.capacity(64, press.head_weights(li, 3)) for li in range(3)]
    assert all(s <= 0.7 * d for s, d in zip(slots, dense))  # one array at the largest budget


def test_errors(tiny):
    with pytest.raises(ValueError, match="head groups"):
        UNCompPress(compression_ratio=0.5, groups=3, calibration=shipped_calibration())
    with pytest.raises(ValueError, match="group_budget_ratio"):
        UNCompPress(compression_ratio=0.5, group_budget_ratio=0.5)
    with pytest.raises(ValueError, match="a group is empty"):
        UNCompPress(compression_ratio=0.5, groups=4).head_groups(0, 3)
    press = UNCompPress(compression_ratio=0.5, calibration="smollm2")  # 30 layers, not 3
    fn, params = tiny.kvjax_split()
    toks, lens = loops.pad_prompts([list(range(1, 40))])
    with pytest.raises(ValueError, match="calibration is for a model"):
        loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens), tail_capacity=4,
                      press=press)
