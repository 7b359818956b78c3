"""ThresholdPress (kvjax/presses/threshold.py): the allocator's counts on a hand case, the
kept sets against numpy over the scorer's own scores (KVzap's log scale; SnapKV's attention
mass), budgets that follow the input, the ratio achieved, the engine's pool holding exactly
what is kept (tokens equal `kvjax.generate`), and the scorers it refuses."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.kvzap import UntrainedWeights
from kvjax.presses.base import LayerContext
from kvjax.presses.threshold import Threshold

INF = np.inf


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(2))


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(1, 101, n)) for n in lengths]


def test_counts_on_a_hand_case():
    """Scores [inf, 0.5, 0.3, 0.1, 0.1, -inf]: one protected entry, four valid, one padding.
    Mass 0.75: 0.5 + 0.3 = 0.8 >= 0.75 of the total 1.0 -> 2 entries + 1 protected = 3.
    Mass 1.0 -> all 4 + 1. Log threshold 0.2 -> inf, 0.5, 0.3 = 3; threshold 0.6 -> 1."""
    s = jnp.asarray([[[INF, 0.5, 0.3, 0.1, 0.1, -INF]]], jnp.float32)
    count = lambda a: int(a.layer_stat(None, None, s, None)[0, 0])  # noqa: E731
    assert count(Threshold(0.75, "attention")) == 3
    assert count(Threshold(1.0, "attention")) == 5
    assert count(Threshold(0.5, "attention")) == 2  # 0.5 alone holds half
    assert count(Threshold(0.2, "log")) == 3
    assert count(Threshold(0.6, "log")) == 1


def _kept_and_scores(model, prompts, press):
    """(kept positions [b][l][k], the scorer's raw scores per layer [L, B, K, T], lengths)."""
    fn, params = model.kvjax_split()
    toks, lens = loops.pad_prompts(prompts)
    toks, lens = jnp.asarray(toks), jnp.asarray(lens)
    _, prompt = fn.prefill(params, toks, lens, obs_spec=press.obs_spec)
    cache = kvjax.compress(press, prompt, tail_capacity=0)
    group = prompt.groups[0]
    views = group.views()
    scores = [np.asarray(press.press.score(
        jax_tree_index(views, li), jax_tree_index(group.layers.obs, li),
        LayerContext(prompt_len=lens, layer_idx=jnp.int32(li), n_layers=group.n_layers)))
        for li in range(group.n_layers)]
    kept = [[kvjax.kept_positions(cache, li)[b] for li in range(group.n_layers)]
            for b in range(len(prompts))]
    return kept, scores, np.asarray(lens), cache


def jax_tree_index(tree, i):
    import jax
    return jax.tree.map(lambda x: x[i], tree)


def test_kvzap_keeps_every_entry_at_or_above_the_threshold(model):
    press = kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=UntrainedWeights(seed=1)),
                                 threshold=0.0)
    kept, scores, lens, _ = _kept_and_scores(model, _prompts([57, 40]), press)
    for b, n in enumerate(lens):
        for li, heads in enumerate(kept[b]):
            for h, pos in enumerate(heads):
                s = scores[li][b, h, :n]
                want = np.flatnonzero((s >= 0.0) | (np.arange(n) < 4))  # 4 sinks: +inf
                np.testing.assert_array_equal(np.sort(pos), want)


def test_snapkv_keeps_the_fewest_entries_holding_the_mass(model):
    press = kvjax.ThresholdPress(press=kvjax.SnapKVPress(window_size=8), threshold=0.6)
    kept, scores, lens, _ = _kept_and_scores(model, _prompts([57, 40], seed=3), press)
    for b, n in enumerate(lens):
        for li, heads in enumerate(kept[b]):
            for h, pos in enumerate(heads):
                s = scores[li][b, h, :n]
                finite = np.isfinite(s)
                vals = np.sort(s[finite])[::-1].astype(np.float32)
                cum = np.cumsum(vals, dtype=np.float32)
                m = int(np.searchsorted(cum, np.float32(0.6) * cum[-1])) + 1
                protected = np.flatnonzero(~finite)  # the window, always kept
                assert len(pos) == m + len(protected)
                assert set(protected) <= set(pos.tolist())
                kept_scores = np.sort(s[[p for p in pos if finite[p]]])[::-1]
                np.testing.assert_allclose(kept_scores, vals[:m], rtol=1e-6)


def test_budgets_follow_the_input_and_the_ratio_is_reported(model):
    press = kvjax.ThresholdPress(press=kvjax.SnapKVPress(window_size=8), threshold=0.5)
    prompts = _prompts([90, 90, 33], seed=5)
    out = kvjax.generate(model, prompts, max_new_tokens=2, press=press)
    length = np.asarray(out.cache.store.length)  # [B, L, K]
    assert len({int(x) for x in length.reshape(-1)}) > 2  # budgets differ by input and head
    ratio = kvjax.achieved_ratio(out.cache, [90, 90, 33])
    np.testing.assert_allclose(ratio, 1 - length.sum(axis=(1, 2)) / (3 * 2 * np.array(
        [90, 90, 33])))
    assert (ratio > 0).all() and (ratio < 1).all()
    # a fixed-ratio press reports about its ratio
    fixed = kvjax.generate(model, prompts, max_new_tokens=2,
                           press=kvjax.SnapKVPress(compression_ratio=0.5, window_size=8))
    np.testing.assert_allclose(kvjax.achieved_ratio(fixed.cache, [90, 90, 33]), 0.5, atol=0.02)
    with pytest.raises(ValueError, match="one length >= 1 per sequence"):
        kvjax.achieved_ratio(out.cache, [90, 90])


def test_the_engine_pool_holds_exactly_what_a_threshold_keeps(model):
    press = kvjax.ThresholdPress(press=kvjax.SnapKVPress(window_size=8), threshold=0.5)
    prompts = _prompts([70, 45], seed=7)
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=16)
    reqs = [eng.submit(ids, press=press, max_new_tokens=4) for ids in prompts]
    eng.step()
    kept = 0
    for ids in prompts:
        out = kvjax.generate(model, [ids], max_new_tokens=1, press=press)
        kept += -(-int(np.asarray(out.cache.store.length).sum()) // 8) * 8  # blocks of 8
    assert eng.stats().slots_used == kept
    eng.run()
    for req, ids in zip(reqs, prompts):
        out = kvjax.generate(model, [ids], max_new_tokens=4, press=press)
        assert req.result().tokens == out.tokens[0, :out.lengths[0]].tolist()


def test_a_new_threshold_never_recompiles(model):
    """The threshold is a traced value (kvjax/values.py): prefill and the decode loop compile
    once across thresholds, in prefill and while decoding, and each run keeps what a
    ThresholdPress built for that threshold alone keeps (the kept sets differ by threshold)."""
    from kvjax import prefill as prefill_mod
    weights = UntrainedWeights(seed=1)
    prompts = _prompts([61, 48], seed=11)

    def run(t, decoding):
        press = kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=weights), threshold=t,
                                     decoding=decoding, compression_interval=4)
        return kvjax.generate(model, prompts, max_new_tokens=9, press=press)

    for decoding in (False, True):
        run(-0.5, decoding)  # warm-up: one compilation of each
        before = (prefill_mod.prefill._cache_size(), loops.decode._cache_size())
        lengths = [np.asarray(run(t, decoding).cache.store.length) for t in (-0.2, 0.0, 0.3)]
        assert (prefill_mod.prefill._cache_size(), loops.decode._cache_size()) == before
        assert not np.array_equal(lengths[0], lengths[2])
    # the traced threshold keeps what the numpy selection of its own scores keeps
    press = kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=weights), threshold=0.3)
    kept, scores, lens, _ = _kept_and_scores(model, prompts, press)
    out = run(0.3, False)
    for b, n in enumerate(lens):
        for li in range(len(scores)):
            got = kvjax.kept_positions(out.cache, li)[b]
            for h, pos in enumerate(got):
                s = scores[li][b, h, :n]
                want = np.flatnonzero((s >= 0.3) | (np.arange(n) < 4))
                np.testing.assert_array_equal(np.sort(pos[pos < n]), want)


@pytest.mark.parametrize("make, says", [
    (lambda: kvjax.ThresholdPress(press=kvjax.KnormPress(), threshold=0.5), "no calibrated"),
    (lambda: kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold=1.5), "share of"),
    (lambda: kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold=0.0), "share of"),
    (lambda: kvjax.ThresholdPress(press=kvjax.SnapKVPress(compression_ratio=0.5),
                                  threshold=0.5), "leave the scorer's compression_ratio"),
    (lambda: kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold=0.5,
                                  compression_ratio=0.5), "follows the input"),
    (lambda: kvjax.ThresholdPress(press=kvjax.AdaKVPress(press=kvjax.SnapKVPress()),
                                  threshold=0.5), "needs a ScorerPress"),
    (lambda: kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold="0.5"), "finite"),
    (lambda: kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=UntrainedWeights()),
                                  threshold=float("nan")), r"threshold=nan\): threshold must be a finite"),
    (lambda: kvjax.ThresholdPress(press=kvjax.KVzapPress(weights=UntrainedWeights()),
                                  threshold=-float("inf")), r"threshold=-inf\): threshold must be a finite"),
])
def test_refused(make, says):
    with pytest.raises(ValueError, match=says):
        make()
