"""Presses that read the question's span. SnapKVPress(question_window=True): the window is the
question's own tokens when the caller knows it; scores against a numpy softmax over exactly
those rows, kept sets against SnapKV with that window on each prompt alone; and the span
through Pipeline for SnapKV and NACL (`question_proxies`)."""

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kept_all, random_prompts, tiny_decoder

import kvjax
from kvjax import loops
from kvjax.cache import LayerView
from kvjax.observation import Observation
from kvjax.presses.snapkv import question_window_scores


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=1, n_layers=2, n_heads=6, vocab_size=101)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((57, 41), seed=0, vocab=101)


_kept_all = kept_all


def test_scores_are_the_question_rows_mean_attention():
    """Ragged prompts (37, 23) and questions (5, 2) in a 8-row observation; no pooling: each
    slot's score is the mean over the question's rows and their query group of a causal
    softmax over the valid slots (numpy), the question's slots +inf."""
    b, t, n, n_kv, h, w = 2, 37, 6, 2, 8, 8
    kq, kk = jax.random.split(jax.random.key(0))
    q = np.asarray(jax.random.normal(kq, (b, w, n, h)), np.float64)
    k = np.asarray(jax.random.normal(kk, (b, n_kv, t, h)), np.float64)
    lengths, qlen = np.array([37, 23]), np.array([5, 2])
    obs = Observation(q_window=jnp.asarray(q, jnp.float32),
                      window_valid=jnp.ones((b, w), bool),
                      question_len=jnp.asarray(qlen))
    prefix = LayerView(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(k, jnp.float32),
                       pos=jnp.broadcast_to(jnp.arange(t), (b, n_kv, t)),
                       length=jnp.asarray(np.repeat(lengths[:, None], n_kv, 1)))
    got = np.asarray(question_window_scores(prefix, obs, jnp.asarray(lengths),
                                            jnp.asarray(qlen), 1, "avg"))
    g = n // n_kv
    for bi in range(b):
        length, m = lengths[bi], qlen[bi]
        for kv in range(n_kv):
            acc = np.zeros(t)
            for row in range(w - m, w):
                pos = length - w + row
                for head in range(kv * g, (kv + 1) * g):
                    logits = k[bi, kv] @ q[bi, row, head] / math.sqrt(h)
                    ok = np.arange(t) <= pos
                    e = np.where(ok, np.exp(logits - logits[ok].max()), 0.0)
                    acc += e / e.sum()
            want = acc / (m * g)
            win = np.arange(t) >= length - m
            assert np.isinf(got[bi, kv][win]).all()
            np.testing.assert_allclose(got[bi, kv][~win & (np.arange(t) < length)],
                                       want[~win & (np.arange(t) < length)], rtol=1e-5,
                                       atol=1e-7)


def test_keeps_what_a_window_of_the_question_keeps(model, prompts):
    """question_len [9, 3]: per prompt, the kept positions of every layer and kv head equal
    SnapKVPress(window_size=9 / 3) on that prompt alone; without a span, the usual window."""
    fn, params = model.kvjax_split()
    press = kvjax.SnapKVPress(compression_ratio=0.6, window_size=16, question_window=True)
    state, _ = loops.start(fn, params, prompts, max_new_tokens=1, press=press,
                           question_len=[9, 3])
    got = _kept_all(state.cache)
    for b, (ids, n) in enumerate(zip(prompts, (9, 3))):
        alone = dataclasses.replace(press, question_window=False, window_size=n)
        ref, _ = loops.start(fn, params, [ids], max_new_tokens=1, press=alone)
        assert [got[2 * layer + b] for layer in range(2)] == _kept_all(ref.cache), (b, n)
    plain, _ = loops.start(fn, params, prompts, max_new_tokens=1, press=press)
    usual, _ = loops.start(fn, params, prompts, max_new_tokens=1,
                           press=dataclasses.replace(press, question_window=False))
    assert _kept_all(plain.cache) == _kept_all(usual.cache)


SPAN_PRESSES = {  # a press reading the span, and its form with the span's length fixed
    "snapkv": (lambda: kvjax.SnapKVPress(compression_ratio=0.6, window_size=8,
                                         question_window=True),
               lambda p, n: dataclasses.replace(p, question_window=False, window_size=n)),
    "nacl": (lambda: kvjax.NACLPress(compression_ratio=0.6, random_fraction=0.0,
                                     question_proxies=True),
             lambda p, n: dataclasses.replace(p, question_proxies=False, proxy_tokens=n)),
}


@pytest.mark.parametrize("name", sorted(SPAN_PRESSES))
def test_pipeline_passes_the_question_span(name):
    """`Pipeline.run(question_aware=True)` hands the question's span to the press (SnapKV's
    window, NACL's proxies): it keeps what the fixed form with the question's length keeps
    (a character tokenizer: the question's token count is its length), not the default's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from eval_helpers import char_tokenizer, tiny_model
    pipe = kvjax.Pipeline(tiny_model(), char_tokenizer())
    context, question = "The door code is 4417. " * 8, " Which code opens the door?"
    make, fixed = SPAN_PRESSES[name]
    press = make()
    got = pipe.run(context, question, press=press, question_aware=True, max_new_tokens=2)
    want = pipe.run(context, question, question_aware=True, max_new_tokens=2,
                    press=fixed(press, len(question)))
    assert kept_all(got.cache) == kept_all(want.cache)
    assert got.tokens == want.tokens
    default = pipe.run(context, question, question_aware=True, max_new_tokens=2,
                       press=fixed(press, 0) if name == "nacl" else
                       dataclasses.replace(press, question_window=False))
    assert kept_all(default.cache) != kept_all(got.cache)  # the span changed what was kept
