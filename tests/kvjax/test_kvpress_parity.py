"""Parity with kvpress on the same tiny random transformers Llama, weights and inputs.

For each press the kept token positions per layer and kv head equal kvpress's (kvpress
gathers kept keys, so we match them back to prompt positions; AdaKV masks instead, so we read
its mask), and the logits of the next 8 greedy steps agree (teacher-forced on kvpress's
tokens, positions continuing from the prompt length as kvpress's pipeline does).
Prompt length 100 and ratios whose kept count int(T(1-r)) equals our ceil(T(1-r)).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
import models
from kvjax import loops
from kvpress_ref import (greedy_logits, greedy_logits_per_layer, kept_positions_by_mask,
                         kept_positions_by_matching, prefill_cache)

kvpress = pytest.importorskip("kvpress")

T = 100
N_KV = 2


def _pairs(r):
    w = dict(window_size=16)
    return {
        "snapkv": (kvpress.SnapKVPress(compression_ratio=r, **w),
                   kvjax.SnapKVPress(compression_ratio=r, **w)),
        "streaming_llm": (kvpress.StreamingLLMPress(compression_ratio=r),
                          kvjax.StreamingLLMPress(compression_ratio=r)),
        "tova": (kvpress.TOVAPress(compression_ratio=r), kvjax.TOVAPress(compression_ratio=r)),
        "knorm": (kvpress.KnormPress(compression_ratio=r), kvjax.KnormPress(compression_ratio=r)),
        "keydiff": (kvpress.KeyDiffPress(compression_ratio=r),
                    kvjax.KeyDiffPress(compression_ratio=r)),
        "observed_attention": (kvpress.ObservedAttentionPress(compression_ratio=r),
                               kvjax.ObservedAttentionPress(compression_ratio=r)),
        "pyramidkv": (kvpress.PyramidKVPress(compression_ratio=r, **w),
                      kvjax.PyramidKVPress(compression_ratio=r, **w)),
        "expected_attention": (
            kvpress.ExpectedAttentionPress(compression_ratio=r, n_future_positions=64),
            kvjax.ExpectedAttentionPress(compression_ratio=r, n_future_positions=64)),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=N_KV,
                      head_dim=16, max_position_embeddings=512, initializer_range=0.1,
                      attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("parity")
    hf.save_pretrained(path)
    model = models.load(path, progress=False, dtype=jnp.float32)[0]
    ids = np.random.RandomState(0).randint(0, 128, (1, T))
    return hf, model, ids


def _ours(model, ids, press):
    fn, params = model.kvjax_split()
    tokens = jnp.asarray(np.pad(ids, ((0, 0), (0, 128 - T))))
    logits, cache = loops.prefill(fn, params, tokens, jnp.array([T]), tail_capacity=16,
                                  press=press)
    kept = [[[kvjax.kept_positions(cache, layer)[0][h].tolist() for h in range(N_KV)]]
            for layer in range(cache.n_layers)]
    return fn, params, logits, cache, kept


def _our_logits(fn, params, cache, tokens):
    out = []
    for t in tokens:
        logits, cache = fn.decode(params, jnp.array([[t]]), jnp.array([1]), cache)
        out.append(np.asarray(logits[0, 0]))
    return np.stack(out)


def _check_logits(hf, model, ids, kv_cache, fn, params, cache, per_layer=False):
    first = int(np.asarray(model(jnp.asarray(ids)))[0, -1].argmax())
    tokens, ref = (greedy_logits_per_layer if per_layer else greedy_logits)(
        hf, kv_cache, first, T, 8)
    np.testing.assert_allclose(_our_logits(fn, params, cache, tokens[:8]), ref, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("name", list(_pairs(0.5)))
def test_kept_indices_and_logits_match_kvpress(setup, name, ratio):
    hf, model, ids = setup
    kp_press, our_press = _pairs(ratio)[name]
    full = prefill_cache(hf, ids)
    compressed = prefill_cache(hf, ids, kp_press)
    ref = kept_positions_by_matching(full, compressed)
    fn, params, _, cache, ours = _ours(model, ids, our_press)
    assert ours == ref
    _check_logits(hf, model, ids, compressed, fn, params, cache, per_layer=name == "pyramidkv")


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_adakv_snapkv_matches_kvpress(setup, ratio):
    """kvpress's AdaKV needs sdpa and masks instead of dropping: compare the kept sets."""
    hf, model, ids = setup
    hf.set_attn_implementation("sdpa")
    try:
        kp = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=16))
        cache_ref = prefill_cache(hf, ids, kp)
        ref = kept_positions_by_mask(hf, T)
        ours_press = kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=ratio,
                                                              window_size=16))
        fn, params, _, cache, ours = _ours(model, ids, ours_press)
        assert ours == ref
        with kp(hf):  # kvpress's attention patch reads the mask during decode too
            _check_logits(hf, model, ids, cache_ref, fn, params, cache)
    finally:
        hf.set_attn_implementation("eager")
