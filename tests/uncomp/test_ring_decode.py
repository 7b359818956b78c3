"""UNComp's head-grouped cache: tail-mode decode equals the dense layout, ring-mode decode
equals a numpy re-implementation and keeps every group at exactly C_g slots."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.cache import LayerCache, Prefix, Tail
from kvjax.grouped import GroupedLayerCache, ring_decode
from kvjax.presses.uncomp import UNCompPress
from kvjax.uncomp.calibration import UNCompCalibration

GROUPS = (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(5))


def _press(tiny, **kw):
    cal = UNCompCalibration(version=1, model_signature=(3, 6, 3, tiny.config.head_dim),
                            head_groups=GROUPS, head_entropy=((0.0,) * 3,) * 3,
                            layer_entropy=(0.0,) * 3, stages=(0,))
    return UNCompPress(compression_ratio=0.6, calibration=cal, window_size=4, **kw)


def _prompts():
    rng = np.random.RandomState(0)
    toks, lens = loops.pad_prompts([list(rng.randint(1, 101, n)) for n in (60, 41)])
    return jnp.asarray(toks), jnp.asarray(lens)


def test_tail_mode_decode_equals_dense_layout(tiny):
    fn, params = tiny.kvjax_split()
    toks, lens = _prompts()
    _, cache = loops.prefill(fn, params, toks, lens, tail_capacity=8, press=_press(tiny))
    assert all(isinstance(layer, GroupedLayerCache) for layer in cache.layers)
    dense = jax.tree.map(jnp.copy, dataclasses.replace(
        cache, layers=tuple(l.dense() for l in cache.layers)))  # extend donates its cache
    steps = [(jnp.array([[5, 6, 7], [8, 9, 0]]), jnp.array([3, 2])),
             (jnp.array([[11], [12]]), jnp.array([1, 1])),
             (jnp.array([[13], [14]]), jnp.array([1, 0]))]
    for tokens, n_new in steps:
        got, cache = loops.extend(fn, params, tokens, n_new, cache, attn_impl="reference")
        want, dense = loops.extend(fn, params, tokens, n_new, dense, attn_impl="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert int(cache.layers[0].tail.count[0]) == 5


def numpy_ring(q, k, v, pos, n_new, prefix, rows, kernel, scale):
    """Independent re-implementation, one (sequence, kv head) at a time with Python lists."""
    b_, t_, kg, g, h = q.shape
    c, w = prefix["k"].shape[2], rows.shape[3]
    outs = np.zeros((b_, t_, kg, g, v.shape[-1]))
    final = {name: np.zeros_like(x) for name, x in prefix.items()}
    final_rows = np.zeros_like(rows)
    for b in range(b_):
        for kh in range(kg):
            n = prefix["length"][b, kh]
            keys, vals = list(prefix["k"][b, kh, :n]), list(prefix["v"][b, kh, :n])
            ps, r = list(prefix["pos"][b, kh, :n]), rows[b, kh, :, :, :n]
            for t in range(n_new[b]):
                keys, vals, ps = keys + [k[b, t, kh]], vals + [v[b, t, kh]], ps + [pos[b, t]]
                logits = np.array(keys) @ q[b, t, kh].T * scale  # [count, G]
                p = np.exp(logits - logits.max(0))
                p = (p / p.sum(0)).T  # [G, count]
                outs[b, t, kh] = p @ np.array(vals)
                r = np.concatenate([np.pad(r[:, 1:], ((0, 0), (0, 0), (0, 1))), p[:, None]], 1)
                count = len(keys)
                recent = np.arange(count) >= count - w
                s = np.where(recent, 0.0, r.mean(1))  # [G, count]
                padded = np.pad(s, ((0, 0), (kernel // 2,) * 2), constant_values=-np.inf)
                s = np.stack([padded[:, i:i + count] for i in range(kernel)]).max(0).mean(0)
                s = np.where(recent, np.inf, s)
                keep = np.sort(np.argsort(-s, kind="stable")[:c])
                keys, vals, ps = [keys[i] for i in keep], [vals[i] for i in keep], \
                    [ps[i] for i in keep]
                r = r[:, :, keep]
            m = len(keys)
            final["k"][b, kh, :m], final["v"][b, kh, :m] = keys, vals
            final["pos"][b, kh, :m], final["length"][b, kh] = ps, m
            final_rows[b, kh, :, :, :m] = r
    return outs, final, final_rows


def test_ring_decode_equals_numpy_reference():
    rng = np.random.default_rng(0)
    b, t, kg, g, h, c, w = 2, 6, 2, 3, 8, 10, 4
    length = np.array([[10, 10], [7, 9]])
    prefix = dict(k=rng.normal(size=(b, kg, c, h)), v=rng.normal(size=(b, kg, c, h)),
                  pos=np.tile(np.arange(c) * 2, (b, kg, 1)), length=length)
    slot_ok = np.arange(c)[None, None] < length[..., None]
    prefix["k"] *= slot_ok[..., None]
    prefix["v"] *= slot_ok[..., None]
    rows = rng.dirichlet(np.ones(c), size=(b, kg, g, w)) * slot_ok[:, :, None, None]
    q, k, v = (rng.normal(size=s) for s in ((b, t, kg, g, h), (b, t, kg, h), (b, t, kg, h)))
    pos = 30 + np.tile(np.arange(t), (b, 1))
    n_new = np.array([6, 4])
    part = LayerCache(prefix=Prefix(**{n: jnp.asarray(x, jnp.float32 if n in "kv" else jnp.int32)
                                       for n, x in prefix.items()}),
                      tail=Tail(k=jnp.zeros((b, kg, 0, h)), v=jnp.zeros((b, kg, 0, h)),
                                pos=jnp.zeros((b, 0), jnp.int32), count=jnp.zeros(b, jnp.int32)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out, part, new_rows = jax.jit(ring_decode, static_argnames=(
        "kernel_size", "pooling", "scale", "sliding_window"))(
        f32(q.reshape(b, t, kg * g, h)), f32(k), f32(v), jnp.asarray(pos, jnp.int32),
        jnp.asarray(n_new), part, f32(rows), kernel_size=3, pooling="max", scale=0.4,
        sliding_window=None)
    want_out, want, want_rows = numpy_ring(q, k, v, pos, n_new, prefix, rows, 3, 0.4)
    for bi in range(b):
        np.testing.assert_allclose(np.asarray(out)[bi, :n_new[bi]],
                                   want_out.reshape(b, t, kg * g, h)[bi, :n_new[bi]], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(part.prefix.length), want["length"])
    assert (want["length"] == c).all()  # every head grew to, then stayed at, C
    np.testing.assert_array_equal(np.asarray(part.prefix.pos), want["pos"])
    np.testing.assert_allclose(np.asarray(part.prefix.k), want["k"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_rows), want_rows, atol=1e-6)


def test_ring_groups_stay_at_capacity_with_one_compilation(tiny):
    press = _press(tiny, decode="ring")
    toks, lens = _prompts()
    prompts = [list(np.asarray(toks[i, :n])) for i, n in enumerate(np.asarray(lens))]
    out = kvjax.generate(tiny, prompts[:1], max_new_tokens=100, press=press)
    before = loops.decode._cache_size()
    out = kvjax.generate(tiny, prompts[:1], max_new_tokens=100, press=press)
    again = kvjax.generate(tiny, prompts[:1], max_new_tokens=70, press=press)
    assert loops.decode._cache_size() == before  # same bucket, traced max_new_tokens: no recompile
    assert int(out.lengths[0]) == 100 and int(again.lengths[0]) == 70
    for layer in out.cache.layers:
        assert layer.ring and all(p.tail.capacity == 0 for p in layer.parts)
        for part in layer.parts:
            np.testing.assert_array_equal(np.asarray(part.prefix.length), part.prefix.capacity)
            assert int(part.prefix.pos.max()) == 60 + 99  # every sampled token is fed back
    rep = kvjax.memory_report(out.cache)
    assert rep.kv_bytes_needed == rep.kv_bytes_held  # exactly C_g per head, nothing else


def test_ring_first_steps_match_tail_mode(tiny):
    """While a group still has room (short prompt, light compression), ring mode evicts
    nothing, so its logits equal tail mode's."""
    fn, params = tiny.kvjax_split()
    toks, lens = _prompts()
    ring_press = dataclasses.replace(_press(tiny, decode="ring"), compression_ratio=0.1)
    _, ring = loops.prefill(fn, params, toks, lens, tail_capacity=4, press=ring_press)
    _, tail = loops.prefill(fn, params, toks, lens, tail_capacity=4,
                            press=dataclasses.replace(ring_press, decode="tail"))
    room = min(int((p.prefix.capacity - p.prefix.length).min())
               for layer in ring.layers for p in layer.parts)
    assert room >= 2
    for tok in (7, 9):
        tokens = jnp.array([[tok], [tok]])
        a, ring = loops.extend(fn, params, tokens, jnp.array([1, 1]), ring, attn_impl="reference")
        b, tail = loops.extend(fn, params, tokens, jnp.array([1, 1]), tail, attn_impl="reference")
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_grouped_cache_errors(tiny):
    with pytest.raises(ValueError, match="decode="):
        UNCompPress(compression_ratio=0.5, decode="rings")
    with pytest.raises(ValueError, match="must come last"):
        kvjax.ComposedPress(presses=(UNCompPress(compression_ratio=0.5),
                                     kvjax.KnormPress(compression_ratio=0.5)))
    with pytest.raises(ValueError, match="cannot wrap a UNCompPress"):
        kvjax.ThinKPress(key_channel_compression_ratio=0.5,
                         press=UNCompPress(compression_ratio=0.5))
    toks, lens = _prompts()
    with pytest.raises(ValueError, match="DecodingPress cannot merge"):
        kvjax.generate(tiny, [list(np.asarray(toks[0, :60]))], max_new_tokens=4,
                       press=_press(tiny),
                       decoding_press=kvjax.DecodingPress(press=kvjax.KnormPress(
                           compression_ratio=0.5), compression_interval=2))
