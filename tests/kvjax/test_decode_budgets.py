"""Decode budgets (FixedSize, RatioOfSeen) and the recent window of a DecodingPress: tokens
and kept positions against a step-by-step numpy re-selection, after every allocator's table;
room in the store; one compilation across budget values; bad budgets refused by name."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.presses.decode_budget import FixedSize, RatioOfSeen, ScoreThreshold
from kvjax.presses.decoding import DecodingPress


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=89, max_seq_len=512)
    return models.Decoder(cfg, rngs=nnx.Rngs(3))


def _streaming_scores(pos, k):
    """StreamingLLM's scores: sinks (pos < 4) first, then later positions higher."""
    return np.where(pos < 4, np.inf, pos.astype(np.float64))


def _keydiff_scores(pos, k):
    """KeyDiff: minus the cosine similarity to the mean unit key of the candidates."""
    k = k.astype(np.float64)
    anchor = (k / np.linalg.norm(k, axis=-1, keepdims=True)).mean(0)
    return -(k @ anchor) / (np.linalg.norm(k, axis=-1) * np.linalg.norm(anchor))


def _budget(rule, seen, n_cand, length):
    """The number of entries a merge keeps, computed by hand from the rule."""
    if isinstance(rule, FixedSize):
        return min(rule.size, n_cand)
    if isinstance(rule, RatioOfSeen):
        return min(math.ceil((1 - rule.compression_ratio) * seen - 1e-9), n_cand)
    return min(length, n_cand)


def _numpy_merge(cache, rule, score, window):
    """Per layer, sequence and kv head: candidates = segment + tail in position order; the
    `window` most recent always survive, the rest by `score` (stable: ties to the earlier
    candidate); the kept ones are written from the segment's offset, its length updated."""
    st, t = cache.store, cache.tail
    k, v, pos = (np.array(x) for x in (st.k, st.v, st.pos))
    off, length = np.asarray(st.offset), np.array(st.length)
    tk, tv, tpos, count = (np.asarray(x) for x in (t.k, t.v, t.pos, t.count))
    seen = np.asarray(cache.next_pos)
    b_size, n_layers, n_kv = length.shape
    row = np.arange(n_kv) // (n_kv // st.rows)
    for layer in range(n_layers):
        for i in range(b_size):
            for j in range(n_kv):
                o, n, r = off[i, layer, j], length[i, layer, j], row[j]
                cp = np.concatenate([pos[i, r, o:o + n], tpos[i, :count[i]]])
                ck = np.concatenate([k[i, r, o:o + n], tk[layer, i, j, :count[i]]])
                cv = np.concatenate([v[i, r, o:o + n], tv[layer, i, j, :count[i]]])
                s = score(cp, ck)
                s = np.where(cp >= seen[i] - window, np.inf, s)
                keep = _budget(rule, seen[i], len(cp), n)
                chosen = np.sort(np.argsort(-s, kind="stable")[:keep])
                pos[i, r, o:o + keep] = cp[chosen]
                k[i, r, o:o + keep], v[i, r, o:o + keep] = ck[chosen], cv[chosen]
                length[i, layer, j] = keep
    store = dataclasses.replace(st, k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                                length=jnp.asarray(length))
    tail = dataclasses.replace(t, count=jnp.zeros_like(t.count))
    return dataclasses.replace(cache, store=store, tail=tail)


PREFILL = {
    "full": lambda: None,
    "snapkv": lambda: kvjax.SnapKVPress(compression_ratio=0.5, window_size=4),
    "adakv": lambda: kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.5,
                                                              window_size=4)),
    "zigzagkv": lambda: kvjax.ZigZagKVPress(compression_ratio=0.5, window_size=4),
}
SCORERS = {"streaming_llm": (kvjax.StreamingLLMPress, _streaming_scores),
           "keydiff": (kvjax.KeyDiffPress, _keydiff_scores)}
CASES = [(p, "ratio", "streaming_llm", 0) for p in PREFILL] + [
    ("snapkv", "fixed", "streaming_llm", 0), ("full", "fixed", "keydiff", 3),
    ("adakv", "ratio", "keydiff", 3), ("zigzagkv", "fixed", "keydiff", 0)]


def _rule(kind):
    return RatioOfSeen(0.5) if kind == "ratio" else FixedSize(24)


@pytest.mark.parametrize("prefill, kind, scorer, window", CASES)
def test_matches_stepwise_numpy_reference(model, prefill, kind, scorer, window):
    prompts = [list(range(3, 40)), list(range(5, 30))]
    interval, n_new = 8, 36
    press, rule = PREFILL[prefill](), _rule(kind)
    make, score = SCORERS[scorer]
    dp = DecodingPress(press=make(), compression_interval=interval, budget=rule,
                       window_size=window)
    got = kvjax.generate(model, prompts, max_new_tokens=n_new, press=press, decoding_press=dp)
    fn, params = model.kvjax_split()
    plan = kvjax.plan.plan_request(fn, prompts, max_new_tokens=n_new, press=press,
                                   decoding_press=dp)
    logits, cache = kvjax.prefill.prefill_request(fn, params, plan)
    step = jax.jit(lambda p, tok, c: fn.decode(p, tok, jnp.array([1, 1]), c))
    out, merges = [], 0
    for _ in range(n_new):
        tok = np.asarray(logits).argmax(-1)
        out.append(tok)
        step_logits, cache = step(params, jnp.asarray(tok[:, None]), cache)
        logits = step_logits[:, 0]
        if int(cache.tail.count.max()) >= interval:
            cache, merges = _numpy_merge(cache, rule, score, window), merges + 1
    assert merges == n_new // interval
    assert got.tokens.tolist() == np.stack(out, 1).tolist()
    for layer in range(cache.n_layers):
        want, have = kvjax.kept_positions(cache, layer), kvjax.kept_positions(got.cache, layer)
        for w_seq, h_seq in zip(want, have):
            for w, h in zip(w_seq, h_seq):
                assert h.tolist() == w.tolist(), (prefill, layer)


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
