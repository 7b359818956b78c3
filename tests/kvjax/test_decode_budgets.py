"""Decode budgets (FixedSize, RatioOfSeen) and the recent window of a DecodingPress: tokens
and kept positions against a step-by-step numpy re-selection, after every allocator's table;
room in the store; one compilation across budget values; bad budgets refused by name."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import greedy_stepwise
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.kvzap import UntrainedWeights
from kvjax.presses.decode_budget import FixedSize, KeepSize, RatioOfSeen, ScoreThreshold
from kvjax.presses.decoding import DecodingPress


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=89, max_seq_len=512)
    return models.Decoder(cfg, rngs=nnx.Rngs(3))


def _streaming_scores(pos, k, state, seen):
    """StreamingLLM's scores: sinks (pos < 4) first, then later positions higher."""
    return np.where(pos < 4, np.inf, pos.astype(np.float64))


def _keydiff_scores(pos, k, state, seen):
    """KeyDiff: minus the cosine similarity to the mean unit key of the candidates."""
    k = k.astype(np.float64)
    anchor = (k / np.linalg.norm(k, axis=-1, keepdims=True)).mean(0)
    return -(k @ anchor) / (np.linalg.norm(k, axis=-1) * np.linalg.norm(anchor))


def _state_scores(pos, k, state, seen):
    """TOVA's and KVzap's decode scores: the per-slot state itself."""
    return state


def _h2o_scores(pos, k, state, seen):
    """H2O: summed attention over the queries that could see the slot."""
    return state / np.maximum(seen - pos, 1)


def _budget(rule, seen, n_cand, length, scores):
    """The number of entries a merge keeps, computed by hand from the rule."""
    if isinstance(rule, FixedSize):
        return min(rule.size, n_cand)
    if isinstance(rule, RatioOfSeen):
        return min(math.ceil((1 - rule.compression_ratio) * seen - 1e-9), n_cand)
    if isinstance(rule, ScoreThreshold):
        return int(np.sum(scores >= rule.threshold))
    return min(length, n_cand)


def _numpy_merge(cache, rule, score, window):
    """Per layer, sequence and kv head: candidates = segment + tail in position order; the
    `window` most recent always survive, the rest by `score` (stable: ties to the earlier
    candidate); the kept ones (and their per-slot state) are written from the segment's
    offset, its length updated."""
    st, t = cache.store, cache.tail
    k, v, pos = (np.array(x) for x in (st.k, st.v, st.pos))
    extra = None if st.extra is None else np.array(st.extra)
    off, length = np.asarray(st.offset), np.array(st.length)
    tk, tv, tpos, count = (np.asarray(x) for x in (t.k, t.v, t.pos, t.count))
    tscore = None if t.score is None else np.asarray(t.score)
    seen = np.asarray(cache.next_pos)
    b_size, n_layers, n_kv = length.shape
    row = np.arange(n_kv) // (n_kv // st.rows)
    for layer in range(n_layers):
        for i in range(b_size):
            for j in range(n_kv):
                o, n, r, c = off[i, layer, j], length[i, layer, j], row[j], count[i]
                cp = np.concatenate([pos[i, r, o:o + n], tpos[i, :c]])
                ck = np.concatenate([k[i, r, o:o + n], tk[layer, i, j, :c]])
                cv = np.concatenate([v[i, r, o:o + n], tv[layer, i, j, :c]])
                cs = None if extra is None else np.concatenate(
                    [extra[i, r, o:o + n, 0], tscore[layer, i, j, :c]])
                s = score(cp, ck, cs, seen[i])
                s = np.where(cp >= seen[i] - window, np.inf, s)
                keep = _budget(rule, seen[i], len(cp), n, s)
                chosen = np.sort(np.argsort(-s, kind="stable")[:keep])
                pos[i, r, o:o + keep] = cp[chosen]
                k[i, r, o:o + keep], v[i, r, o:o + keep] = ck[chosen], cv[chosen]
                if extra is not None:
                    extra[i, r, o:o + keep, 0] = cs[chosen]
                length[i, layer, j] = keep
    store = dataclasses.replace(st, k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                                length=jnp.asarray(length),
                                extra=None if extra is None else jnp.asarray(extra))
    tail = dataclasses.replace(t, count=jnp.zeros_like(t.count),
                               score=None if t.score is None else jnp.zeros_like(t.score))
    return dataclasses.replace(cache, store=store, tail=tail)


PREFILL = {
    "full": lambda: None,
    "snapkv": lambda: kvjax.SnapKVPress(compression_ratio=0.5, window_size=4),
    "adakv": lambda: kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.5,
                                                              window_size=4)),
    "zigzagkv": lambda: kvjax.ZigZagKVPress(compression_ratio=0.5, window_size=4),
}
SCORERS = {"streaming_llm": (kvjax.StreamingLLMPress, _streaming_scores),
           "keydiff": (kvjax.KeyDiffPress, _keydiff_scores),
           "tova": (kvjax.TOVAPress, _state_scores),
           "h2o": (kvjax.ObservedAttentionPress, _h2o_scores),
           "kvzap": (lambda: kvjax.KVzapPress(weights=UntrainedWeights(seed=1),
                                              allocation="uniform"), _state_scores)}
CASES = [(p, "ratio", "streaming_llm", 0) for p in PREFILL] + [
    ("snapkv", "fixed", "streaming_llm", 0), ("full", "fixed", "keydiff", 3),
    ("adakv", "ratio", "keydiff", 3), ("zigzagkv", "fixed", "keydiff", 0),
    ("full", "keep", "tova", 0), ("snapkv", "fixed", "tova", 2), ("adakv", "ratio", "tova", 0),
    ("full", "ratio", "h2o", 0), ("zigzagkv", "keep", "h2o", 2), ("snapkv", "fixed", "h2o", 0),
    ("full", "ratio", "kvzap", 0), ("adakv", "keep", "kvzap", 0),
    ("full", "threshold", "kvzap", 2), ("zigzagkv", "threshold", "kvzap", 0)]


def _rule(kind):
    return {"ratio": RatioOfSeen(0.5), "fixed": FixedSize(24), "keep": KeepSize(),
            "threshold": ScoreThreshold(0.0)}[kind]


def _check_against_numpy(model, press, dp, rule, score, window, *, hooked=None):
    """kvjax.generate(press, hooked or dp) against a step-by-step decode whose merges are
    `_numpy_merge(rule, score, window)`: same tokens, same kept positions at the end."""
    prompts = [list(range(3, 40)), list(range(5, 30))]
    n_new, interval = 36, dp.compression_interval
    if hooked is None:
        got = kvjax.generate(model, prompts, max_new_tokens=n_new, press=press,
                             decoding_press=dp)
    else:
        got = kvjax.generate(model, prompts, max_new_tokens=n_new, press=hooked)
    fn, params = model.kvjax_split()
    plan = kvjax.plan.plan_request(fn, prompts, max_new_tokens=n_new, press=press,
                                   decoding_press=dp)
    logits, cache = kvjax.prefill.prefill_request(fn, params, plan)
    merges = []

    def merge(c):
        if int(c.tail.count.max()) < interval:
            return None
        merges.append(1)
        return _numpy_merge(c, rule, score, window)
    out, cache = greedy_stepwise(fn, params, logits, cache, n_new, merge)
    assert len(merges) == n_new // interval
    assert got.tokens.tolist() == out.tolist()
    for layer in range(cache.n_layers):
        want, have = kvjax.kept_positions(cache, layer), kvjax.kept_positions(got.cache, layer)
        for w_seq, h_seq in zip(want, have):
            for w, h in zip(w_seq, h_seq):
                assert h.tolist() == w.tolist(), layer


@pytest.mark.parametrize("prefill, kind, scorer, window", CASES)
def test_matches_stepwise_numpy_reference(model, prefill, kind, scorer, window):
    press, rule = PREFILL[prefill](), _rule(kind)
    make, score = SCORERS[scorer]
    dp = DecodingPress(press=make(), compression_interval=8, budget=rule, window_size=window)
    _check_against_numpy(model, press, dp, rule, score, window)


def test_threshold_press_decoding_keeps_what_reaches_the_threshold(model):
    """ThresholdPress(KVzap, t, decoding=True, sliding_window_size=3): the prompt's threshold
    table, then every 8 generated tokens each (layer, kv head) keeps exactly the candidates
    scoring >= t and the 3 most recent."""
    scorer = SCORERS["kvzap"][0]()
    hooked = kvjax.ThresholdPress(press=scorer, threshold=0.0, decoding=True,
                                  compression_interval=8, sliding_window_size=3)
    assert hooked.decode_hook == DecodingPress(press=scorer, compression_interval=8,
                                               budget=ScoreThreshold(0.0), window_size=3)
    _check_against_numpy(model, kvjax.ThresholdPress(press=scorer, threshold=0.0),
                         hooked.decode_hook, ScoreThreshold(0.0), _state_scores, 3,
                         hooked=hooked)


def test_ratio_budget_grows_with_the_tokens_seen(model):
    """No prefill press: after every merge each segment holds ceil(0.25 n) of the n tokens
    processed; the store reserved room for the bound of the whole request."""
    prompt, interval, n_new = list(range(1, 41)), 16, 64
    dp = DecodingPress(press=kvjax.KeyDiffPress(), compression_interval=interval,
                       budget=RatioOfSeen(0.75))
    out = kvjax.generate(model, [prompt], max_new_tokens=n_new, decoding_press=dp)
    cache = out.cache
    seen_at_merge = int(cache.next_pos[0]) - int(cache.tail.count[0])
    assert seen_at_merge == 40 + n_new // interval * interval  # every token is fed
    assert np.all(np.asarray(cache.store.length) == math.ceil(0.25 * seen_at_merge))
    # room per segment: the full prompt's width, or 0.25 (prompt bucket + output buffer)
    plan = kvjax.plan.plan_request(model.kvjax_split()[0], [prompt], max_new_tokens=n_new,
                                   decoding_press=dp)
    bucket = plan.tokens.shape[1]
    room = max(bucket, math.ceil(0.25 * (bucket + plan.out_len)))
    assert cache.store.max_segment == room
    assert cache.store.slots >= cache.n_layers * 2 * room


def test_fixed_size_bounds_memory_one_compilation(model):
    loops.decode.clear_cache()
    dp = DecodingPress(press=kvjax.StreamingLLMPress(), compression_interval=16,
                       budget=FixedSize(20))
    out = kvjax.generate(model, [list(range(1, 60))], max_new_tokens=120, decoding_press=dp)
    assert np.all(np.asarray(out.cache.store.length) == 20)
    seg = kvjax.cache.layer_view(out.cache.store, 1)
    newest = int(out.cache.next_pos[0]) - int(out.cache.tail.count[0])
    assert np.asarray(seg.pos[0, 0, :20]).tolist() == [0, 1, 2, 3] + list(
        range(newest - 16, newest))
    kvjax.generate(model, [list(range(1, 50))], max_new_tokens=100, decoding_press=dp)
    assert loops.decode._cache_size() == 1


def test_bad_budgets_are_named():
    with pytest.raises(ValueError, match="below the 4 sinks plus the self.window_size=2"):
        DecodingPress(press=kvjax.StreamingLLMPress(), budget=FixedSize(5), window_size=2)
    with pytest.raises(ValueError, match="compression_ratio=1.0"):
        RatioOfSeen(1.0)
    with pytest.raises(ValueError, match="size=0"):
        FixedSize(0)
    with pytest.raises(ValueError, match="KnormPress scores have no calibrated scale"):
        DecodingPress(press=kvjax.KnormPress(), budget=ScoreThreshold(-4.0))
    with pytest.raises(ValueError, match="threshold=nan"):
        ScoreThreshold(float("nan"))
    with pytest.raises(ValueError, match="budget=0.5"):
        DecodingPress(press=kvjax.KnormPress(), budget=0.5)
    with pytest.raises(ValueError, match=r"ThresholdPress\(decoding=True\) over SnapKVPress"):
        kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold=0.5, decoding=True)


def _state_by_position(cache, layer):
    """{(seq, kv head, position): state} of layer `layer`'s segment and tail slots."""
    st, t = cache.store, cache.tail
    view = kvjax.cache.layer_view(st, layer)
    idx, _ = kvjax.cache.slot_index(st, layer, view.capacity)
    seg = np.asarray(kvjax.cache.gather_rows(st.extra, idx))[..., 0]
    pos, length = np.asarray(view.pos), np.asarray(view.length)
    tpos, count, tsc = np.asarray(t.pos), np.asarray(t.count), np.asarray(t.score[layer])
    out = {}
    for b in range(length.shape[0]):
        for h in range(length.shape[1]):
            out.update({(b, h, int(pos[b, h, s])): seg[b, h, s] for s in range(length[b, h])})
            out.update({(b, h, int(tpos[b, s])): tsc[b, h, s] for s in range(count[b])})
    return out


def _whole_sequence(model, prompt, out, obs_spec):
    """The prefill of prompt + every fed token: (fn, params, Prompt)."""
    fn, params = model.kvjax_split()
    seq = prompt + out.tokens[0, :out.lengths[0]].tolist()
    tokens, lengths = loops.pad_prompts([seq])
    _, whole = loops.prefill_prompt(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                    obs_spec=obs_spec, attn_impl="reference")
    return fn, params, whole, len(seq)


@pytest.mark.parametrize("mode", ["h2o", "tova"])
def test_attention_state_equals_the_whole_sequence_prefill(model, mode):
    """Before any merge, a full cache's H2O sums are the column sums of a prefill over the
    whole sequence, and TOVA's state is that prefill's last-query attention (means over each
    kv head's query group); the hook's own attention gives plain generate's tokens."""
    prompt, n_new = list(range(2, 35)), 12
    scorer = kvjax.ObservedAttentionPress() if mode == "h2o" else kvjax.TOVAPress()
    dp = DecodingPress(press=scorer, compression_interval=64)
    out = kvjax.generate(model, [prompt], max_new_tokens=n_new, decoding_press=dp)
    assert out.tokens.tolist() == kvjax.generate(model, [prompt], max_new_tokens=n_new).tokens.tolist()
    spec = kvjax.ObsSpec(column_sums=True) if mode == "h2o" else kvjax.ObsSpec(window=1)
    fn, params, whole, n = _whole_sequence(model, prompt, out, spec)
    assert int(out.cache.next_pos[0]) == n
    obs = whole.groups[0].layers.obs
    for layer in range(out.cache.n_layers):
        got = _state_by_position(out.cache, layer)
        if mode == "h2o":
            cols = np.asarray(obs.column_sums[layer])  # [B, N, T]
            want = cols.reshape(1, 2, 2, -1).mean(axis=2)
        else:
            full = jax.tree.map(lambda x: x[layer], whole.groups[0].views())
            o = jax.tree.map(lambda x: x[layer], obs)
            probs = kvjax.presses.window.window_attention(full, o, jnp.array([n]), 1)
            want = np.asarray(probs[:, :, :, 0]).mean(axis=2)
        assert len(got) == 2 * n
        for (b, h, p), value in got.items():
            np.testing.assert_allclose(value, want[b, h, p], rtol=2e-4, atol=1e-6)


def test_kvzap_state_equals_its_prefill_scores(model):
    """Every token's decode-time KVzap score, prompt and generated, equals the press's score
    of that token in a prefill of the whole sequence (same hidden states: nothing evicted)."""
    prompt, n_new = list(range(2, 35)), 12
    press = kvjax.KVzapPress(weights=UntrainedWeights(seed=1), allocation="uniform")
    out = kvjax.generate(model, [prompt], max_new_tokens=n_new,
                         decoding_press=DecodingPress(press=press, compression_interval=64))
    fn, params, whole, n = _whole_sequence(model, prompt, out, kvjax.ObsSpec(hidden=True))
    views, obs = whole.groups[0].views(), whole.groups[0].layers.obs
    for layer in range(out.cache.n_layers):
        pick = lambda x: x[layer]
        ctx = kvjax.presses.base.LayerContext(jnp.array([n]), layer, out.cache.n_layers)
        want = np.asarray(press.score(jax.tree.map(pick, views), jax.tree.map(pick, obs), ctx))
        got = _state_by_position(out.cache, layer)
        assert len(got) == 2 * n
        for (b, h, p), value in got.items():
            np.testing.assert_allclose(value, want[b, h, p], rtol=1e-4, atol=1e-5)


def test_threshold_budget_follows_the_scores(model):
    """ScoreThreshold(t) keeps, after the last merge, exactly the candidates scoring >= t
    (numpy re-selection above), so a higher threshold keeps fewer; one compilation serves
    every threshold and every prompt of one bucket (the threshold is a traced value)."""
    press = kvjax.KVzapPress(weights=UntrainedWeights(seed=1), allocation="uniform")
    kept = []
    loops.decode.clear_cache()
    for t in (-0.5, 0.0, 0.5):
        dp = DecodingPress(press=press, compression_interval=8, budget=ScoreThreshold(t))
        out = kvjax.generate(model, [list(range(2, 40))], max_new_tokens=24, decoding_press=dp)
        kept.append(int(np.sum(np.asarray(out.cache.store.length))))
    assert kept[0] > kept[1] > kept[2] > 0
    for prompt in (list(range(2, 40)), list(range(5, 50))):
        kvjax.generate(model, [prompt], max_new_tokens=20, decoding_press=dp)
    assert loops.decode._cache_size() == 1
