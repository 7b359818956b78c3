"""The jitted generate loop: equivalence with a full forward and with transformers' greedy
generate, compilation discipline, samplers, streaming and input validation."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from conftest import prefill_cache
gen = importlib.import_module("kvjax.loops")


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=256)
    return models.Decoder(cfg, rngs=nnx.Rngs(0))


def test_decode_after_prefill_equals_full_forward(tiny):
    """Logits of prefill + extend + step decode equal one forward over the whole sequence."""
    ids = np.random.RandomState(0).randint(0, 97, (2, 40))
    full = np.asarray(tiny(jnp.asarray(ids)))
    logits, cache = prefill_cache(tiny, ids[:, :20], np.array([20, 20]), tail_capacity=32)
    ext, cache = tiny.decode(jnp.asarray(ids[:, 20:30]), jnp.array([10, 10]), cache)
    np.testing.assert_allclose(np.asarray(ext), full[:, 20:30], atol=1e-5)
    for t in range(30, 40):
        step, cache = tiny.decode(jnp.asarray(ids[:, t:t + 1]), jnp.array([1, 1]), cache)
        np.testing.assert_allclose(np.asarray(step[:, 0]), full[:, t], atol=1e-5)
    assert np.asarray(cache.next_pos).tolist() == [40, 40]


def _greedy_by_full_forward(model, prompt, n):
    """Independent greedy loop: a fresh full forward over the whole sequence every step."""
    last_logits = nnx.jit(lambda m, ids, length: m.prefill(ids, length)[0])
    seq = list(prompt)
    for _ in range(n):
        ids = np.zeros((1, 64), np.int32)
        ids[0, :len(seq)] = seq
        seq.append(int(np.asarray(last_logits(model, ids, jnp.array([len(seq)])))[0].argmax()))
    return seq[len(prompt):]


def test_generate_greedy_matches_naive_loop_on_ragged_batch(tiny):
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(0, 97, n)) for n in (17, 5, 30)]
    out = kvjax.generate(tiny, prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):
        assert out.tokens[i].tolist() == _greedy_by_full_forward(tiny, p, 12)
    assert out.lengths.tolist() == [12, 12, 12]
    assert np.asarray(out.cache.next_pos).tolist() == [17 + 12, 5 + 12, 30 + 12]


def test_generate_matches_transformers_greedy(tiny_hf_dirs):
    import torch
    hf, path = tiny_hf_dirs["mistral_window8"]
    model = models.load(path, progress=False, dtype=jnp.float32)[0]
    prompt = list(np.random.RandomState(5).randint(0, 128, 19))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                          min_new_tokens=16, pad_token_id=0)[0, len(prompt):].tolist()
    assert kvjax.generate(model, [prompt], max_new_tokens=16).tokens[0].tolist() == ref


def test_eos_stops_sequence_and_pads(tiny):
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    free = kvjax.generate(tiny, prompts, max_new_tokens=10).tokens
    eos = int(free[0, 3])  # the 4th token of row 0 becomes EOS
    out = kvjax.generate(tiny, prompts, max_new_tokens=10, eos_id=eos, pad_id=-1)
    first = list(free[0]).index(eos)
    assert out.lengths[0] == first + 1
    assert out.tokens[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out.tokens[0, first + 1:] == -1).all()


def test_one_compilation_per_bucket(tiny):
    fn, params = tiny.kvjax_split()
    gen.prefill.clear_cache()
    gen.decode.clear_cache()
    kvjax.generate(tiny, [[1, 2, 3, 4, 5]], max_new_tokens=7)
    kvjax.generate(tiny, [[5, 4, 3, 2, 1, 6, 7, 8, 9, 10, 11]], max_new_tokens=20)
    assert gen.prefill._cache_size() == 1
    assert gen.decode._cache_size() == 1
    kvjax.generate(tiny, [list(range(1, 80))], max_new_tokens=7)  # next prompt bucket
    assert gen.prefill._cache_size() == 2
    assert gen.decode._cache_size() == 2  # the cache shape changed with the bucket


def test_stream_equals_generate(tiny):
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1]]
    ref = kvjax.generate(tiny, prompts, max_new_tokens=6).tokens
    steps = list(kvjax.generate_stream(tiny, prompts, max_new_tokens=6))
    assert np.stack(steps, axis=1).tolist() == ref.tolist()


def test_samplers():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    key = jax.random.key(0)
    greedy = kvjax.Greedy()(logits, key).tolist()
    assert greedy == [1, 0]
    assert kvjax.TopK(k=1)(logits, key).tolist() == greedy
    assert kvjax.TopP(p=0.01)(logits, key).tolist() == greedy
    keys = jax.random.split(key, 4000)
    draws = jax.vmap(lambda k: kvjax.Temperature(1.0)(logits, k))(keys)
    freq = np.asarray([(draws[:, 0] == j).mean() for j in range(3)])
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
    top2 = jax.vmap(lambda k: kvjax.TopK(k=2)(logits, k))(keys)
    assert set(np.unique(top2[:, 0]).tolist()) == {1, 2}
    np.testing.assert_allclose((top2[:, 0] == 1).mean(), 0.6 / 0.9, atol=0.03)
    nucleus = jax.vmap(lambda k: kvjax.TopP(p=0.65)(logits, k))(keys)
    assert set(np.unique(nucleus[:, 0]).tolist()) == {1, 2}


def test_sampling_is_deterministic_given_key(tiny):
    a = kvjax.generate(tiny, [[1, 2, 3]], max_new_tokens=8, sampler=kvjax.TopK(k=20),
                       rng=jax.random.key(3)).tokens
    b = kvjax.generate(tiny, [[1, 2, 3]], max_new_tokens=8, sampler=kvjax.TopK(k=20),
                       rng=jax.random.key(3)).tokens
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[[1, 2], []], max_new_tokens=4), "empty prompt"),
    (dict(input_ids=[], max_new_tokens=4), "empty batch"),
    (dict(input_ids=[[1, 2]], max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(input_ids=[[1] * 300], max_new_tokens=1), "exceeds the model's context"),
    (dict(input_ids=[[1, 2]], max_new_tokens=255), "max_new_tokens=255"),
    (dict(input_ids=[[1, 2]], max_new_tokens=2, attn_impl="cuda"), "attn_impl='cuda'"),
])
def test_bad_input(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvjax.generate(tiny, **kwargs)


@pytest.mark.parametrize("ids, match", [
    ([[1, 500, 2]], "token id 500 in prompt 0 is outside the model's vocabulary"),
    ([[1, 2], [3, 97]], "token id 97 in prompt 1 .*vocab_size=97"),
    ([[1, -1, 2]], "token id -1 in prompt 0 is negative"),
    ([[1.0, 2.0]], "dtype float64; token ids must be integers"),
    (np.array([[1.5, 2.0]], np.float32), "dtype float32"),
    ([[True, False]], "bool"),
])
def test_token_ids_are_checked(tiny, ids, match):
    """Out-of-vocabulary, negative, float and bool ids are refused before anything runs
    (nnx.Embed would fill NaN or clip; a float would be truncated)."""
    with pytest.raises(ValueError, match=match):
        kvjax.generate(tiny, ids, max_new_tokens=2)


def test_last_vocabulary_id_is_accepted(tiny):
    out = kvjax.generate(tiny, [[1, tiny.config.vocab_size - 1]], max_new_tokens=2)
    assert out.tokens.shape == (1, 2)


def test_bad_sampler_args():
    with pytest.raises(ValueError, match="temperature=0"):
        kvjax.Temperature(0)
    with pytest.raises(ValueError, match="k=0"):
        kvjax.TopK(k=0)
    with pytest.raises(ValueError, match="p=1.5"):
        kvjax.TopP(p=1.5)
