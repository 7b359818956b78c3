"""ThinK: channel scores against brute force, thin-key attention against zero-filled keys,
λ = 0 identity, kvpress's pruned channels, thin storage, value-channel pruning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.attention import cached_attention_reference
from kvjax.cache import layer_view, write_view
from kvjax.presses.think import (ThinKPress, key_channel_scores, value_channel_scores)

W = 8


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
                                  vocab_size=97)
    return models.Decoder(cfg, rngs=nnx.Rngs(5))


PROMPTS = [list(np.random.RandomState(0).randint(0, 97, 50)),
           list(np.random.RandomState(1).randint(0, 97, 37))]


def _prefill(model, press, prompts=PROMPTS, tail=8):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    return loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                         tail_capacity=tail, press=press)


def test_channel_ranking_equals_brute_force_frobenius():
    rng = np.random.RandomState(0)
    b, w, n, n_kv, s, h = 2, 5, 6, 2, 11, 16
    q = rng.randn(b, w, n, h).astype(np.float32) * rng.rand(1, 1, 1, h) * 3
    k = rng.randn(b, n_kv, s, h).astype(np.float32) * rng.rand(1, 1, 1, h) * 3
    got = np.asarray(key_channel_scores(jnp.asarray(q), jnp.ones((b, w), bool), jnp.asarray(k),
                                        jnp.ones((b, n_kv, s), bool)))
    g = n // n_kv
    for bi in range(b):
        for j in range(n_kv):
            brute = [sum(np.linalg.norm(np.outer(q[bi, :, j * g + gi, c], k[bi, j, :, c])) ** 2
                         for gi in range(g)) for c in range(h)]
            assert np.argsort(brute).tolist() == np.argsort(got[bi, j]).tolist()


def test_value_scores_equal_output_error_of_dropping_a_channel():
    rng = np.random.RandomState(1)
    probs = jax.nn.softmax(jnp.asarray(rng.randn(1, 2, 3, 4, 9)), axis=-1)
    v = rng.randn(1, 2, 9, 8).astype(np.float32)
    got = np.asarray(value_channel_scores(probs, jnp.asarray(v)))
    full = np.einsum("bkgwc,bkch->bkgwh", np.asarray(probs), v)
    for c in range(8):
        v0 = v.copy()
        v0[..., c] = 0
        err = ((full - np.einsum("bkgwc,bkch->bkgwh", np.asarray(probs), v0)) ** 2).sum((2, 3))
        np.testing.assert_allclose(got[..., c], err[..., c], rtol=1e-5)


def test_lambda_zero_reproduces_token_press(model):
    snap = kvjax.SnapKVPress(compression_ratio=0.5, window_size=W)
    think0 = ThinKPress(key_channel_compression_ratio=0.0, window_size=W, press=snap)
    a, b = _prefill(model, snap), _prefill(model, think0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ga = kvjax.generate(model, PROMPTS, max_new_tokens=6, press=snap).tokens
    gb = kvjax.generate(model, PROMPTS, max_new_tokens=6, press=think0).tokens
    assert ga.tolist() == gb.tolist()


def _zero_filled(view, h=16):
    """The view with thin keys scattered back to H channels (zeros elsewhere)."""
    one_hot = jax.nn.one_hot(view.channels, h, dtype=view.k.dtype)  # [B, K, Dk, H]
    k_full = jnp.einsum("bkcd,bkdh->bkch", view.k, one_hot)
    return dataclasses.replace(view, k=k_full, channels=None)


def _views(cache):
    return [(layer_view(cache.store, i), cache.tail.layer(i)) for i in range(cache.n_layers)]


def _zero_filled_cache(cache):
    """The same cache with full-width (zero-filled) keys in a full-width store."""
    st = cache.store
    wide = dataclasses.replace(st, k=jnp.zeros(st.k.shape[:3] + (16,), st.k.dtype),
                               channels=None)
    for i, (view, _) in enumerate(_views(cache)):
        wide = write_view(wide, i, _zero_filled(view))
    return dataclasses.replace(cache, store=wide)


def test_thin_attention_equals_zero_filled_keys(model):
    press = ThinKPress(key_channel_compression_ratio=0.5, window_size=W,
                       press=kvjax.SnapKVPress(compression_ratio=0.5, window_size=W))
    _, cache = _prefill(model, press)
    q = jax.random.normal(jax.random.key(0), (2, 1, 6, 16))
    q_pos = cache.next_pos[:, None]
    for view, tail in _views(cache):
        thin = cached_attention_reference(q, q_pos, view, tail)
        full = cached_attention_reference(q, q_pos, _zero_filled(view), tail)
        np.testing.assert_allclose(np.asarray(thin), np.asarray(full), atol=1e-5)
    zf = _zero_filled_cache(cache)
    tok = jnp.array([[3], [4]])
    la, _ = model.decode(tok, jnp.array([1, 1]), cache)
    lb, _ = model.decode(tok, jnp.array([1, 1]), zf)
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-5)


def test_storage_is_thin_and_recent_window_is_full_width(model):
    snap = kvjax.SnapKVPress(compression_ratio=0.5, window_size=W)
    _, base = _prefill(model, snap)
    _, cache = _prefill(model, ThinKPress(key_channel_compression_ratio=0.5, window_size=W,
                                          press=snap))
    st = cache.store
    assert st.k.shape[-1] * 2 == base.store.k.shape[-1] == 16  # exactly half as wide
    assert st.channels.shape == st.length.shape + (8,)  # a column of the table
    assert st.v.shape[-1] == 16 and cache.tail.k.shape[-1] == 16  # values, tail untouched
    assert (np.diff(np.asarray(st.channels), axis=-1) > 0).all()
    for b, n in enumerate(len(p) for p in PROMPTS):
        assert np.asarray(cache.tail.pos[b, :W]).tolist() == list(range(n - W, n))
        assert int(cache.tail.count[b]) == W
    for layer in range(cache.n_layers):  # same tokens as SnapKV: segment + recent window
        thin, want = kvjax.kept_positions(cache, layer), kvjax.kept_positions(base, layer)
        for b, n in enumerate(len(p) for p in PROMPTS):
            for h in range(2):
                assert thin[b][h].tolist() == want[b][h].tolist()
                seg = layer_view(st, layer)
                assert int(seg.length[b, h]) == len(want[b][h]) - W  # window in the tail
    rep_t, rep_b = kvjax.memory_report(cache), kvjax.memory_report(base)
    assert rep_t.key_width == 8 and rep_b.key_width == 16
    assert rep_t.kv_bytes_needed < rep_b.kv_bytes_needed


def test_composed_form_equals_wrapped_form(model):
    snap = kvjax.SnapKVPress(compression_ratio=0.5, window_size=W)
    wrapped = ThinKPress(key_channel_compression_ratio=0.5, window_size=W, press=snap)
    composed = kvjax.ComposedPress(presses=(snap, ThinKPress(key_channel_compression_ratio=0.5,
                                                             window_size=W)))
    for x, y in zip(jax.tree.leaves(_prefill(model, wrapped)),
                    jax.tree.leaves(_prefill(model, composed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_value_pruning_equals_zeroed_value_channels(model):
    press = ThinKPress(key_channel_compression_ratio=0.5, value_channel_compression_ratio=0.25,
                       window_size=W, press=kvjax.SnapKVPress(compression_ratio=0.5,
                                                              window_size=W))
    _, cache = _prefill(model, press)
    q = jax.random.normal(jax.random.key(1), (2, 1, 6, 16))
    q_pos = cache.next_pos[:, None]
    for p, tail in _views(cache):
        assert p.v.shape[-1] == 12 and p.value_channels.shape[-1] == 12
        one_hot = jax.nn.one_hot(p.value_channels, 16, dtype=p.v.dtype)
        v_full = jnp.einsum("bkcd,bkdh->bkch", p.v, one_hot)
        ref = dataclasses.replace(_zero_filled(p), v=v_full, value_channels=None)
        np.testing.assert_allclose(
            np.asarray(cached_attention_reference(q, q_pos, p, tail)),
            np.asarray(cached_attention_reference(q, q_pos, ref, tail)), atol=1e-5)
    out = kvjax.generate(model, PROMPTS, max_new_tokens=4, press=press)
    assert out.lengths.tolist() == [4, 4]


def test_think_alone_matches_kvpress_pruned_channels(tiny_hf_dirs):
    """kvpress's ThinKPress zeroes the pruned channels of every prompt key; we store the
    others. Both score with mean_t q^2 (averaged over the GQA group, which is kvpress's own
    handling) times mean_s k^2 over all prompt keys, window 32: the pruned sets must match."""
    import torch
    kvpress = pytest.importorskip("kvpress")
    from kvpress_ref import prefill_cache
    hf, path = tiny_hf_dirs["llama_gqa3_tied_rope3"]
    ours = models.load(path, progress=False, dtype=jnp.float32)[0]
    ids = np.random.RandomState(3).randint(0, 128, (1, 70))
    compressed = prefill_cache(hf, ids, kvpress.ThinKPress(key_channel_compression_ratio=0.5,
                                                           window_size=32))
    _, cache = _prefill(ours, ThinKPress(key_channel_compression_ratio=0.5, window_size=32),
                        prompts=[list(ids[0])])
    for li, lk in enumerate(compressed.layers):
        zeroed = (lk.keys.numpy()[0] == 0).all(axis=1)  # [K, H]
        for h in range(zeroed.shape[0]):
            kept = set(np.asarray(cache.store.channels[0, li, h]).tolist())
            assert set(np.flatnonzero(~zeroed[h]).tolist()) == kept
    del torch


@pytest.mark.parametrize("kwargs, match", [
    (dict(key_channel_compression_ratio=1.0), "key_channel_compression_ratio=1.0"),
    (dict(key_channel_compression_ratio=-0.1), "key_channel_compression_ratio=-0.1"),
    (dict(value_channel_compression_ratio=1.2), "value_channel_compression_ratio=1.2"),
    (dict(window_size=0), "window_size=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThinKPress(**kwargs)


def test_window_longer_than_prompt_and_order_in_composition(model):
    with pytest.raises(ValueError, match="window_size=32 of ThinKPress"):
        kvjax.generate(model, [list(range(1, 20))], max_new_tokens=2,
                       press=ThinKPress(window_size=32))
    with pytest.raises(ValueError, match="must come last"):
        kvjax.ComposedPress(presses=(ThinKPress(), kvjax.KnormPress(compression_ratio=0.5)))
