"""DecodingPress: merges inside the jitted loop, bounded memory, against a numpy re-selection."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.presses.decoding import DecodingPress


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=89, max_seq_len=512)
    return models.Decoder(cfg, rngs=nnx.Rngs(2))


def _numpy_merge(cache, capacity, n_sink=4):
    """Independent StreamingLLM re-selection: per row and kv head keep, among the valid prefix
    and tail slots, the first `n_sink` positions and the most recent ones (`capacity` in all).
    (Positions are exact, unlike key-norm scores whose near-ties between repeated tokens
    would make a float-rounding-sensitive reference.)"""
    layers = []
    for layer in cache.layers:
        p, t = layer.prefix, layer.tail
        k = np.concatenate([np.asarray(p.k), np.asarray(t.k)], 2)
        v = np.concatenate([np.asarray(p.v), np.asarray(t.v)], 2)
        b, h = k.shape[:2]
        pos = np.concatenate([np.asarray(p.pos), np.broadcast_to(
            np.asarray(t.pos)[:, None], (b, h, t.capacity))], 2)
        new_k, new_v, new_pos = (np.zeros_like(np.asarray(x)) for x in (p.k, p.v, p.pos))
        length = np.zeros((b, h), np.int32)
        for i in range(b):
            for j in range(h):
                valid = [s for s in range(p.capacity) if s < int(p.length[i, j])] + \
                        [p.capacity + s for s in range(int(t.count[i]))]
                by_pos = sorted(valid, key=lambda s: pos[i, j, s])
                sinks = [s for s in by_pos if pos[i, j, s] < n_sink]
                rest = [s for s in by_pos if pos[i, j, s] >= n_sink]
                chosen = sorted(sinks + rest[max(0, len(rest) - (capacity - len(sinks))):],
                                key=lambda s: pos[i, j, s])
                n = len(chosen)
                new_k[i, j, :n], new_v[i, j, :n], new_pos[i, j, :n] = \
                    k[i, j, chosen], v[i, j, chosen], pos[i, j, chosen]
                length[i, j] = n
        prefix = kvjax.Prefix(k=jnp.asarray(new_k), v=jnp.asarray(new_v),
                              pos=jnp.asarray(new_pos), length=jnp.asarray(length))
        tail = kvjax.Tail(k=t.k, v=t.v, pos=t.pos, count=jnp.zeros_like(t.count))
        layers.append(kvjax.LayerCache(prefix=prefix, tail=tail))
    return kvjax.KVCache(layers=tuple(layers), next_pos=cache.next_pos)


def test_matches_stepwise_numpy_reference(model):
    prompts = [list(range(3, 40)), list(range(5, 30))]
    interval, n_new = 8, 30
    press = kvjax.KnormPress(compression_ratio=0.5)  # prefill press: any
    dp = DecodingPress(press=kvjax.StreamingLLMPress(compression_ratio=0.5),
                       compression_interval=interval)
    got = kvjax.generate(model, prompts, max_new_tokens=n_new, press=press, decoding_press=dp)
    # reference: same prefill, then a Python loop with numpy merges at the same points
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    logits, cache = loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                  tail_capacity=interval, press=press)
    capacity = cache.layers[0].prefix.capacity
    out = []
    for _ in range(n_new):
        tok = np.asarray(logits).argmax(-1)
        out.append(tok)
        step_logits, cache = fn.decode(params, jnp.asarray(tok[:, None]), jnp.array([1, 1]),
                                       cache)
        logits = step_logits[:, 0]
        if int(cache.layers[0].tail.count.max()) >= interval:
            cache = _numpy_merge(cache, capacity)
    assert got.tokens.tolist() == np.stack(out, 1).tolist()


def test_memory_bounded_over_long_generation_one_compilation(model):
    loops.decode.clear_cache()
    dp = DecodingPress(press=kvjax.StreamingLLMPress(compression_ratio=0.5),
                       compression_interval=16)
    press = kvjax.StreamingLLMPress(compression_ratio=0.5)
    out = kvjax.generate(model, [list(range(1, 60))], max_new_tokens=200, press=press,
                         decoding_press=dp)
    assert out.lengths.tolist() == [200]
    layer = out.cache.layers[0]
    cap = math.ceil(64 * 0.5)
    assert layer.prefix.capacity == cap and layer.tail.capacity == 16
    assert int(layer.prefix.length.max()) <= cap and int(layer.tail.count.max()) < 16
    # StreamingLLM: the 4 sinks plus the most recent positions survive every merge
    kept = np.asarray(layer.prefix.pos[0, 0, :int(layer.prefix.length[0, 0])]).tolist()
    newest = int(out.cache.next_pos[0]) - int(layer.tail.count[0])
    assert kept == [0, 1, 2, 3] + list(range(newest - (len(kept) - 4), newest))
    kvjax.generate(model, [list(range(1, 60))], max_new_tokens=150, press=press,
                   decoding_press=dp)
    assert loops.decode._cache_size() == 1


def test_rejects_observation_presses():
    with pytest.raises(ValueError, match="query-free scorer"):
        DecodingPress(press=kvjax.SnapKVPress(compression_ratio=0.5))
    with pytest.raises(ValueError, match="compression_interval=0"):
        DecodingPress(press=kvjax.KnormPress(), compression_interval=0)
