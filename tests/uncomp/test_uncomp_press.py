"""UNCompPress: HeadGroups budgets (mean = uniform, group ratios), calibration use, segment
sizes and bytes in the store, any scorer inside the groups, errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.compress import static_prompt_size
from kvjax.presses.parts import StaticSize
from kvjax.presses.uncomp import UNCompPress, allocate, group_weights
from kvjax.uncomp.calibration import UNCompCalibration, shipped_calibration
from kvjax.writer import aligned_slots


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("groups, n_kv", [(2, 2), (2, 3), (3, 6), (4, 8)])
def test_mean_budget_equals_uniform(ratio, groups, n_kv):
    press = UNCompPress(compression_ratio=ratio, groups=groups)
    alloc = press.allocator()
    w = press.head_weights(0, n_kv)
    n = np.arange(20, 300)[:, None].repeat(n_kv, 1)
    b = alloc.static_budgets(n, w)
    uniform = np.array([math.ceil(round((1 - ratio) * x, 6)) for x in n[:, 0]])
    assert (b.sum(1) == uniform * n_kv).all()
    assert (b >= 1).all() and (b <= n).all()
    size = alloc.capacity(StaticSize.prompt((300,), n_kv), n_kv)
    assert b.max() <= size.segments[0] and size.total == n_kv * uniform[-1]
    low, high = b[:, w == w.min()], b[:, w == w.max()]
    big = n[:, 0] >= 200
    np.testing.assert_allclose(high[big].mean() / low[big].mean(), 2.0, rtol=0.05)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("groups, n_kv", [(2, 2), (2, 3), (3, 6),
                                          (4, 8)])
def test_traced_budgets_equal_host_budgets(ratio, groups, n_kv):
    """What compress runs (`layer_budgets`, jnp) equals the host budgets the static
    capacities are computed from (`static_budgets`, numpy)."""
    alloc = UNCompPress(compression_ratio=ratio, groups=groups).allocator()
    n = np.arange(20, 300)[:, None].repeat(n_kv, 1)
    b = alloc.static_budgets(n, alloc.head_weights(0, n_kv))
    traced = alloc.layer_budgets(jnp.asarray(n, jnp.int32), jnp.int32(0), 1)
    np.testing.assert_array_equal(np.asarray(traced), b)


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
    """Each (layer, kv head) is a segment of the store as long as its budget; the store
    holds the kept entries (of the bucket's static budgets) and nothing at the largest
    head's budget."""
    groups = (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))
    press = UNCompPress(compression_ratio=0.5, calibration=_cal(tiny, groups))
    fn, params = tiny.kvjax_split()
    toks, lens = loops.pad_prompts([list(range(1, 61))])
    assert toks.shape[1] == 64
    _, cache = loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens), tail_capacity=4,
                             press=press)
    store = cache.store
    assert store.rows == 1 and cache.hook is None
    length = np.asarray(store.length)[0]  # [L, K]
    entry = tiny.config.head_dim * 4 * 2
    for li in range(3):
        (low, high) = groups[li]
        w = press.head_weights(li, 3)
        assert (w[list(high)] > w[list(low)].max()).all()
        assert length[li].sum() == 3 * 30
        assert length[li, list(high)].tolist() == [46]  # 90 * (1,1,2) / 4 + leftover
        assert length[li, list(low)].max() <= 23
        for h, pos in enumerate(kvjax.kept_positions(cache, li)[0]):
            assert len(pos) == length[li, h] and len(set(pos.tolist())) == len(pos)
    size = static_prompt_size(press, (64,) * 3, 3)
    assert size.segments == tuple(press.allocator().capacity(
        StaticSize.prompt((64,) * 3, 3), 3).segments)
    assert store.max_segment == max(size.segments) and store.slots == aligned_slots(size.total)
    rep = kvjax.memory_report(cache)
    assert rep.kv_bytes_needed == rep.prefix_kv_bytes_needed == 3 * 3 * 30 * entry
    held = sum(x.nbytes for x in (store.k, store.v, cache.tail.k, cache.tail.v))
    assert rep.kv_bytes_held == held
    assert rep.prefix_kv_bytes_held == store.slots * entry == (3 * 3 * 32) * entry
    assert held == (3 * 3 * 32 + 3 * 3 * 4) * entry  # the store (bucket budgets) + 4-slot tails
    dense = 3 * 3 * max(size.segments)  # one array per layer at the largest head's budget
    assert store.slots <= 0.7 * dense
    assert rep.prefix_kv_bytes_held / rep.prefix_kv_bytes_needed <= 64 / 60


def test_any_scorer_inside_the_groups(tiny):
    """UNComp's budgets over KNorm's scores: every head keeps its budget's lowest-norm keys
    (a numpy top-k over the prompt's keys)."""
    groups = (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))
    press = UNCompPress(compression_ratio=0.5, calibration=_cal(tiny, groups),
                        scorer=kvjax.KnormPress(compression_ratio=0.5))
    fn, params = tiny.kvjax_split()
    toks, lens = loops.pad_prompts([list(range(1, 61)), list(range(5, 38))])
    toks, lens = jnp.asarray(toks), jnp.asarray(lens)
    _, cache = loops.prefill(fn, params, toks, lens, tail_capacity=4, press=press)
    _, prompt = loops.prefill_prompt(fn, params, toks, lens, obs_spec=press.obs_spec)
    keys = np.asarray(prompt.groups[0].layers.k, np.float64)  # [L, B, K, T, H]
    length = np.asarray(cache.store.length)
    for li in range(3):
        for b, n in enumerate(np.asarray(lens)):
            for h, pos in enumerate(kvjax.kept_positions(cache, li)[b]):
                norms = np.linalg.norm(keys[li, b, h, :n], axis=-1)
                want = np.sort(np.argsort(norms, kind="stable")[:length[b, li, h]])
                np.testing.assert_array_equal(pos, want)
        assert (length[:, li].sum(-1) == 3 * np.ceil(0.5 * np.asarray(lens))).all()


def test_errors(tiny):
    with pytest.raises(ValueError, match="head groups"):
        UNCompPress(compression_ratio=0.5, groups=3, calibration=shipped_calibration())
    with pytest.raises(ValueError, match="group_budget_ratio"):
        UNCompPress(compression_ratio=0.5, group_budget_ratio=0.5)
    with pytest.raises(ValueError, match="a group is empty"):
        UNCompPress(compression_ratio=0.5, groups=4).allocator().head_groups(0, 3)
    with pytest.raises(ValueError, match="a group is empty"):
        UNCompPress(compression_ratio=0.5, groups=4).head_weights(0, 3)
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="compression_ratio"):
            UNCompPress(compression_ratio=ratio)
    with pytest.raises(ValueError, match="is not a ScorerPress"):
        UNCompPress(compression_ratio=0.5, scorer=kvjax.AdaKVPress(
            press=kvjax.KnormPress(compression_ratio=0.5)))
    press = UNCompPress(compression_ratio=0.5, calibration="smollm2")  # 30 layers, not 3
    fn, params = tiny.kvjax_split()
    toks, lens = loops.pad_prompts([list(range(1, 40))])
    with pytest.raises(ValueError, match="calibration is for a model"):
        loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens), tail_capacity=4,
                      press=press)
