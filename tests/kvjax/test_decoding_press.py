"""DecodingPress: merges inside the jitted loop over every allocator's table, bounded memory,
against a numpy re-selection; refused combinations."""

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
from kvjax.presses.decoding import DecodingPress


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=89, max_seq_len=512)
    return models.Decoder(cfg, rngs=nnx.Rngs(2))


def _streaming_choice(cand, n, n_sink=4):
    """StreamingLLM: the first `n_sink` positions and the most recent ones, n in all."""
    sinks = [c for c in cand if c[0] < n_sink]
    rest = [c for c in cand if c[0] >= n_sink]
    return sinks + rest[max(0, len(rest) - (n - len(sinks))):]


def _keydiff_choice(cand, n):
    """KeyDiff: the n keys least cosine-similar to the mean unit key of the candidates."""
    k = np.stack([c[1] for c in cand]).astype(np.float64)
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    anchor = unit.mean(0)
    score = -(k @ anchor) / (np.linalg.norm(k, axis=-1) * np.linalg.norm(anchor))
    return [cand[i] for i in np.argsort(-score, kind="stable")[:n]]


def _numpy_merge(cache, choose=_streaming_choice):
    """Independent re-selection, written on numpy copies of the store: per layer, row and kv
    head, `choose` keeps as many of the segment's valid slots and the tail as the segment holds
    (`length`), written back at the segment's slots in position order."""
    st, t = cache.store, cache.tail
    k, v, pos = (np.array(x) for x in (st.k, st.v, st.pos))
    off, length = np.asarray(st.offset), np.asarray(st.length)
    tk, tv, tpos, count = (np.asarray(x) for x in (t.k, t.v, t.pos, t.count))
    b_size, n_layers, n_kv = length.shape
    row = np.arange(n_kv) // (n_kv // st.rows)
    for layer in range(n_layers):
        for i in range(b_size):
            for j in range(n_kv):
                o, n, r = off[i, layer, j], length[i, layer, j], row[j]
                cand = [(pos[i, r, o + s], k[i, r, o + s], v[i, r, o + s]) for s in range(n)]
                cand += [(tpos[i, s], tk[layer, i, j, s], tv[layer, i, j, s])
                         for s in range(count[i])]
                cand.sort(key=lambda c: c[0])
                chosen = sorted(choose(cand, n), key=lambda c: c[0])
                for s, (p_, k_, v_) in enumerate(chosen):
                    pos[i, r, o + s], k[i, r, o + s], v[i, r, o + s] = p_, k_, v_
    store = dataclasses.replace(st, k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos))
    tail = dataclasses.replace(t, count=jnp.zeros_like(t.count))
    return dataclasses.replace(cache, store=store, tail=tail)


# every allocator's table: uniform, per layer, per head (data), per input layer, head groups
PREFILL_PRESSES = {
    "knorm": lambda: kvjax.KnormPress(compression_ratio=0.5),
    "snapkv": lambda: kvjax.SnapKVPress(compression_ratio=0.5, window_size=4),
    "pyramidkv": lambda: kvjax.PyramidKVPress(compression_ratio=0.5, window_size=4),
    "adakv": lambda: kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.5,
                                                              window_size=4)),
    "zigzagkv": lambda: kvjax.ZigZagKVPress(compression_ratio=0.5, window_size=4),
    "uncomp": lambda: kvjax.UNCompPress(compression_ratio=0.5, window_size=4),
}


DECODING = {"streaming_llm": (kvjax.StreamingLLMPress, _streaming_choice),
            "keydiff": (kvjax.KeyDiffPress, _keydiff_choice)}


@pytest.mark.parametrize("name, scorer", [(n, "streaming_llm") for n in PREFILL_PRESSES]
                         + [("snapkv", "keydiff")])
def test_matches_stepwise_numpy_reference(model, name, scorer):
    prompts = [list(range(3, 40)), list(range(5, 30))]
    interval, n_new = 8, 30
    press = PREFILL_PRESSES[name]()
    make, choose = DECODING[scorer]
    dp = DecodingPress(press=make(compression_ratio=0.5), compression_interval=interval)
    got = kvjax.generate(model, prompts, max_new_tokens=n_new, press=press, decoding_press=dp)
    # reference: same prefill, then a Python loop with numpy merges at the same points
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    logits, cache = loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                  tail_capacity=interval, press=press)
    out, cache = greedy_stepwise(
        fn, params, logits, cache, n_new,
        lambda c: _numpy_merge(c, choose) if int(c.tail.count.max()) >= interval else None)
    assert got.tokens.tolist() == out.tolist()
    np.testing.assert_array_equal(np.asarray(got.cache.store.length),
                                  np.asarray(cache.store.length))  # segments keep their size


def test_zigzag_keeps_the_generated_tokens(model):
    """The first version merged ZigZagKV's tail into an empty placeholder and lost every
    generated token; on the store each layer's segment takes them like any other press."""
    prompts = [list(range(3, 60))]
    dp = DecodingPress(press=kvjax.StreamingLLMPress(compression_ratio=0.5),
                       compression_interval=8)
    for press in (kvjax.ZigZagKVPress(compression_ratio=0.5, window_size=4),
                  kvjax.SnapKVPress(compression_ratio=0.5, window_size=4)):
        out = kvjax.generate(model, prompts, max_new_tokens=40, press=press, decoding_press=dp)
        end = int(out.cache.next_pos[0])
        for layer in range(out.cache.n_layers):
            for kept in kvjax.kept_positions(out.cache, layer)[0]:
                if len(kept) > 4 + 8:  # a segment longer than the sinks + one interval
                    assert set(range(end - 8, end)) <= set(kept.tolist()), (press, layer)


def test_memory_bounded_over_long_generation_one_compilation(model):
    loops.decode.clear_cache()
    dp = DecodingPress(press=kvjax.StreamingLLMPress(compression_ratio=0.5),
                       compression_interval=16)
    press = kvjax.StreamingLLMPress(compression_ratio=0.5)
    out = kvjax.generate(model, [list(range(1, 60))], max_new_tokens=200, press=press,
                         decoding_press=dp)
    assert out.lengths.tolist() == [200]
    cache = out.cache
    assert cache.tail.capacity == 16 and int(cache.tail.count.max()) < 16
    assert int(cache.store.length.max()) == math.ceil(59 * 0.5)  # segments keep their size
    # StreamingLLM: the 4 sinks plus the most recent positions survive every merge
    seg = kvjax.cache.layer_view(cache.store, 0)
    kept = np.asarray(seg.pos[0, 0, :int(seg.length[0, 0])]).tolist()
    newest = int(cache.next_pos[0]) - int(cache.tail.count[0])
    assert kept == [0, 1, 2, 3] + list(range(newest - (len(kept) - 4), newest))
    kvjax.generate(model, [list(range(1, 60))], max_new_tokens=150, press=press,
                   decoding_press=dp)
    assert loops.decode._cache_size() == 1


def test_refused_combinations_name_both_presses(model):
    dp = DecodingPress(press=kvjax.KnormPress(compression_ratio=0.5))
    think = kvjax.ThinKPress(key_channel_compression_ratio=0.5, window_size=4)
    with pytest.raises(ValueError, match="DecodingPress.*ThinKPress"):
        kvjax.generate(model, [list(range(1, 30))], max_new_tokens=4, press=think,
                       decoding_press=dp)
    ring = kvjax.UNCompPress(compression_ratio=0.5, decode="ring", window_size=4)
    with pytest.raises(ValueError, match="UNCompPress.*DecodingPress"):
        kvjax.generate(model, [list(range(1, 30))], max_new_tokens=4, press=ring,
                       decoding_press=dp)


def test_rejects_observation_presses():
    with pytest.raises(ValueError, match="query-free scorer"):
        DecodingPress(press=kvjax.SnapKVPress(compression_ratio=0.5))
    with pytest.raises(ValueError, match="compression_interval=0"):
        DecodingPress(press=kvjax.KnormPress(), compression_interval=0)
