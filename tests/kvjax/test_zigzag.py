"""ZigZagKV: LMBA against brute force, the allocator on hand-computed cases, equal-LMBA
reduces to SnapKV, the store's bytes and its equivalence with a plain masked layout, any scorer
under the layer budgets."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.presses import select
from kvjax.presses.zigzag import ZigZagKVPress, allocate, lmba_per_head
from kvjax.writer import Selection, write_store

W = 8


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97)
    return models.Decoder(cfg, rngs=nnx.Rngs(7))


PROMPTS = [list(np.random.RandomState(0).randint(0, 97, 61)),
           list(np.random.RandomState(1).randint(0, 97, 44))]


def _prefill(model, press, prompts=PROMPTS):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    return loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                         tail_capacity=8, press=press)


def test_lmba_hand_case_and_brute_force():
    # one head, window of 2 rows: mean row = [0.5, 0.3, 0.1, 0.1]; 0.9 needs 3 tokens
    rows = jnp.array([[0.6, 0.2, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    assert int(lmba_per_head(rows, jnp.ones(4, bool), 0.9)) == 3
    assert int(lmba_per_head(rows, jnp.ones(4, bool), 0.5)) == 1
    assert int(lmba_per_head(rows, jnp.ones(4, bool), 1.0)) == 4
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(13) * 0.3, size=(5, 3))  # [heads, W, C]
    got = np.asarray(lmba_per_head(jnp.asarray(probs), jnp.ones(13, bool), 0.8))
    for h in range(5):
        a = probs[h].mean(0)
        brute = min(n for n in range(1, 14) if np.sort(a)[::-1][:n].sum() >= 0.8 * a.sum()
                    - 1e-9)
        assert got[h] == brute


def test_allocation_hand_cases():
    b = allocate(jnp.array([1.0, 2.0, 3.0]), jnp.int32(10), jnp.int32(20), floor_ratio=0.2,
                 window=4)
    assert b.tolist() == [6, 10, 14]  # 2 + 8 * 3 * u with u = 1/6, 2/6, 3/6
    b = allocate(jnp.array([1.0, 1.0, 10.0]), jnp.int32(10), jnp.int32(18), floor_ratio=0.2,
                 window=4)
    assert b.tolist() == [6, 6, 18]  # [4, 4, 22] clamped to [5, 18], excess 2 spread evenly


@pytest.mark.parametrize("seed", range(5))
def test_allocation_sum_exact_and_floor(seed):
    rng = np.random.RandomState(seed)
    lmba = jnp.asarray(rng.randint(1, 50, 12).astype(np.float32))
    t = int(rng.randint(40, 200))
    b_avg = math.ceil(t * rng.uniform(0.1, 0.9))
    budgets = np.asarray(allocate(lmba, jnp.int32(b_avg), jnp.int32(t), floor_ratio=0.3,
                                  window=W))
    assert budgets.sum() == 12 * b_avg
    assert budgets.min() >= min(W + 1, b_avg) and budgets.max() <= t
    assert (budgets >= math.floor(0.3 * b_avg)).all()  # the floor survives redistribution
    exact = _allocation_by_bisection(np.asarray(lmba, np.float64), b_avg, t, 0.3, W)
    assert np.abs(budgets - exact).max() < 1  # integer rounding of the exact allocation


def _allocation_by_bisection(lmba, b_avg, t, floor_ratio, window):
    """The real-valued allocation, solved another way than `allocate`'s redistribution loop:
    B_l = clip(floor + c * u_l, min(window + 1, b_avg), t) with u = lmba / sum(lmba), and the
    one scalar c with sum(B) = L * b_avg found by bisection (the sum is monotone in c)."""
    u = lmba / lmba.sum()
    budgets = lambda c: np.clip(floor_ratio * b_avg + c * u, min(window + 1, b_avg), t)
    lo, hi = -1e9, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if budgets(mid).sum() < len(lmba) * b_avg else (lo, mid)
    return budgets((lo + hi) / 2)


def test_equal_lmba_gives_uniform_budgets_and_snapkv_indices(model):
    zz = ZigZagKVPress(compression_ratio=0.5, window_size=W, profile=(1.0, 1.0, 1.0, 1.0))
    snap = kvjax.SnapKVPress(compression_ratio=0.5, window_size=W, kernel_size=7,
                             pooling="max")
    _, a = _prefill(model, zz)
    _, b = _prefill(model, snap)
    for layer in range(4):
        ka, kb = kvjax.kept_positions(a, layer), kvjax.kept_positions(b, layer)
        for r, n in enumerate(len(p) for p in PROMPTS):
            for h in range(2):
                assert len(ka[r][h]) == math.ceil(n / 2)
                assert ka[r][h].tolist() == kb[r][h].tolist()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kernel_size, pooling", [(5, "avg"), (7, "max")])
def test_uniform_allocator_keeps_snapkv_indices(model, ratio, kernel_size, pooling):
    """budget_floor_ratio=1 is the uniform allocator (every B_l = B_avg, the dynamic LMBA
    path still runs): the kept positions of every layer and kv head equal SnapKVPress's,
    run independently with the same window, kernel and pooling."""
    sel = dict(window_size=W, kernel_size=kernel_size, pooling=pooling)
    zz = ZigZagKVPress(compression_ratio=ratio, budget_floor_ratio=1.0, **sel)
    _, a = _prefill(model, zz)
    _, b = _prefill(model, kvjax.SnapKVPress(compression_ratio=ratio, **sel))
    for layer in range(4):
        ka, kb = kvjax.kept_positions(a, layer), kvjax.kept_positions(b, layer)
        for r, n in enumerate(len(p) for p in PROMPTS):
            for h in range(2):
                assert len(ka[r][h]) == math.ceil(n * (1 - ratio))
                assert ka[r][h].tolist() == kb[r][h].tolist()


def test_store_bytes_follow_budgets_with_one_compilation(model):
    # a low floor makes the per-input budgets differ widely on this tiny model
    press = ZigZagKVPress(compression_ratio=0.6, window_size=W, budget_floor_ratio=0.2)
    loops.prefill.clear_cache()
    _, cache = _prefill(model, press)
    _, cache2 = _prefill(model, press, prompts=[PROMPTS[1], PROMPTS[0][:50]])
    assert loops.prefill._cache_size() == 1
    length = np.asarray(cache.store.length)  # [B, L, K]
    assert (length == length[..., :1]).all()  # one budget for the kv heads of a layer
    budgets = length[..., 0]
    assert len(set(budgets[0].tolist())) > 1 and budgets[0].tolist() != budgets[1].tolist()
    for r, n in enumerate(len(p) for p in PROMPTS):
        assert budgets[r].sum() == 4 * math.ceil(n * 0.4)
    h = cache.store.k.shape[-1]
    per_entry = h * 4 * 2  # one kv head's key + value, f32
    slots = 4 * 2 * math.ceil(64 * 0.4)  # L * K * B_avg of the 64-token bucket, per row
    assert cache.store.slots == slots  # 208: already a multiple of 8
    rep = kvjax.memory_report(cache)
    assert rep.prefix_kv_bytes_needed == int(length.sum()) * per_entry  # valid = budgets
    # documented padding: only what length bucketing adds (store sized for the 64 bucket)
    assert rep.prefix_kv_bytes_held == 2 * slots * per_entry


def _masked_layout(full, cache):
    """The same kept tokens as segments of the whole prompt's width (the full cache's table
    and sizes), masked by length: a layout built without any allocator."""
    views = [kvjax.cache.layer_view(full.store, i) for i in range(full.n_layers)]
    keep = []
    for i, view in enumerate(views):
        mask = np.zeros(view.pos.shape, bool)
        for r, heads in enumerate(kvjax.kept_positions(cache, i)):
            for h, kept in enumerate(heads):
                kept = kept[kept < int(full.next_pos[r])]  # the prompt part (tail is empty)
                mask[r, h, kept] = True
        keep.append(select.compact(view, jnp.asarray(mask), view.capacity))
    stack = lambda f: jnp.stack([f(v) for v in keep])
    sel = Selection(k=stack(lambda v: v.k), v=stack(lambda v: v.v), pos=stack(lambda v: v.pos),
                    length=stack(lambda v: v.length))
    store = write_store(sel, slots=full.store.slots, max_segment=full.store.max_segment)
    return dataclasses.replace(full, store=store)


def test_store_generation_equals_masked_layout(model):
    press = ZigZagKVPress(compression_ratio=0.6, window_size=W)
    logits, packed = _prefill(model, press)
    _, full = _prefill(model, None)
    masked = _masked_layout(full, packed)
    fn, params = model.kvjax_split()
    tok_a = tok_b = jnp.argmax(logits, -1)[:, None]
    for _ in range(6):
        la, packed = fn.decode(params, tok_a, jnp.array([1, 1]), packed)
        lb, masked = fn.decode(params, tok_b, jnp.array([1, 1]), masked)
        np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-5)
        tok_a = tok_b = jnp.argmax(la[:, -1], -1)[:, None]
    out = kvjax.generate(model, PROMPTS, max_new_tokens=6, press=press)
    assert out.lengths.tolist() == [6, 6]


def test_any_scorer_inside_the_layer_budgets(model):
    """The allocator takes any scorer: TOVA's tokens under ZigZagKV's layer budgets."""
    press = ZigZagKVPress(compression_ratio=0.5, window_size=W, scorer=kvjax.TOVAPress())
    _, cache = _prefill(model, press)
    _, plain = _prefill(model, ZigZagKVPress(compression_ratio=0.5, window_size=W))
    np.testing.assert_array_equal(np.asarray(cache.store.length), np.asarray(plain.store.length))
    for layer in range(4):  # TOVA scores are shared by the kv heads: identical kept sets
        kept = kvjax.kept_positions(cache, layer)
        for r in range(2):
            assert kept[r][0].tolist() == kept[r][1].tolist()
            assert int(cache.next_pos[r]) - 1 in kept[r][0]  # TOVA keeps the last token
    with pytest.raises(ValueError, match="not a ScorerPress"):
        ZigZagKVPress(compression_ratio=0.5, scorer=kvjax.AdaKVPress(press=kvjax.KnormPress()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention_mass=0.0), "attention_mass=0.0"),
    (dict(attention_mass=1.5), "attention_mass=1.5"),
    (dict(budget_floor_ratio=-0.1), "budget_floor_ratio=-0.1"),
    (dict(budget_floor_ratio=1.1), "budget_floor_ratio=1.1"),
    (dict(compression_ratio=1.0), "compression_ratio=1.0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZigZagKVPress(**kwargs)


def test_profile_layer_mismatch(model):
    with pytest.raises(ValueError, match="profile has 3 layers, the model 4"):
        _prefill(model, ZigZagKVPress(compression_ratio=0.5, window_size=W,
                                      profile=(1.0, 2.0, 3.0)))
