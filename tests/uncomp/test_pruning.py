"""Hidden-state token pruning in `models.Decoder.prefill(prefill_keep=...)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.observation import ObsSpec

LENGTHS = (57, 40)


@pytest.fixture(scope="module")
def setup():
    cfg = models.ModelConfig.tiny(n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=101)
    model = models.Decoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.RandomState(0)
    toks, lens = loops.pad_prompts([list(rng.randint(0, 101, n)) for n in LENGTHS])
    return model, jnp.asarray(toks), jnp.asarray(lens)


def test_keep_all_equals_plain_forward_exactly(setup):
    model, toks, lens = setup
    t = toks.shape[1]
    plain = model.prefill(toks, lens, tail_capacity=4, obs_spec=ObsSpec(window=8))
    same = model.prefill(toks, lens, tail_capacity=4, obs_spec=ObsSpec(window=8),
                         prefill_keep=(None, t, t, None))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pruning_keeps_original_positions_and_last_window(setup):
    model, toks, lens = setup
    logits, cache, obs = model.prefill(toks, lens, tail_capacity=4, obs_spec=ObsSpec(window=8),
                                       prefill_keep=(None, None, 32, 16))
    assert [l.prefix.capacity for l in cache.layers] == [64, 64, 32, 16]
    assert np.asarray(cache.next_pos).tolist() == list(LENGTHS)
    prev = None
    for layer in cache.layers[2:]:
        for b, n in enumerate(LENGTHS):
            m = int(layer.prefix.length[b, 0])
            pos = np.asarray(layer.prefix.pos[b, 0, :m])
            assert m == min(layer.prefix.capacity, n)
            assert (np.diff(pos) > 0).all() and pos.max() == n - 1
            assert set(range(n - 8, n)) <= set(pos.tolist())
            if prev is not None:  # later stages keep a subset of earlier ones
                assert set(pos.tolist()) <= set(prev[b])
        prev = {b: np.asarray(layer.prefix.pos[b, 0, :int(layer.prefix.length[b, 0])]).tolist()
                for b in range(2)}
    assert obs[2].q_window.shape[1] == 8 and np.isfinite(np.asarray(logits)).all()
    # decode continues from the original positions over the smaller caches
    step, cache = model.decode(jnp.array([[5], [6]]), jnp.array([1, 1]), cache)
    assert np.isfinite(np.asarray(step)).all()
    assert np.asarray(cache.layers[3].tail.pos[:, 0]).tolist() == list(LENGTHS)


def test_pruned_prefill_then_press(setup):
    model, toks, lens = setup
    press = kvjax.UNCompPress(compression_ratio=0.5)
    _, cache, obs = model.prefill(toks, lens, tail_capacity=4, obs_spec=press.obs_spec,
                                  prefill_keep=(None, None, 32, 32))
    cache = press.compress(cache, obs)
    for li, layer in enumerate(cache.layers):
        n_in = 64 if li < 2 else 32
        for b, n in enumerate(LENGTHS):
            total = sum(int(part.prefix.length[b].sum()) for part in layer.parts)
            assert total == 2 * int(np.ceil(0.5 * min(n, n_in)))


def test_bad_schedules(setup):
    model, toks, lens = setup
    with pytest.raises(ValueError, match="4 layers"):
        model.prefill(toks, lens, tail_capacity=4, prefill_keep=(None, 32))
    with pytest.raises(ValueError, match="prune_window"):
        model.prefill(toks, lens, tail_capacity=4, prefill_keep=(None, None, 4, None))
    with pytest.raises(ValueError, match="at most the last"):
        model.prefill(toks, lens, tail_capacity=4, obs_spec=ObsSpec(window=32),
                      prefill_keep=(None, None, 32, None))
