"""Pipeline on SmolLM2: question-agnostic and question-aware compression equal the same steps
done by hand with the lower-level functions; streaming equals the one-shot answer."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax.demo import needle_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2", progress=False, dtype=jnp.float32)


def _greedy_by_hand(model, ctx_ids, q_ids, press, n):
    logits, prompt = model.prefill(jnp.asarray([ctx_ids]), jnp.array([len(ctx_ids)]),
                                   obs_spec=press.obs_spec)
    cache = kvjax.compress(press, prompt, tail_capacity=len(q_ids) + n)
    logits, cache = model.decode(jnp.asarray([q_ids]), jnp.array([len(q_ids)]), cache)
    tok = int(np.asarray(logits[0, -1]).argmax())
    out = [tok]
    for _ in range(n - 1):
        logits, cache = model.decode(jnp.asarray([[tok]]), jnp.array([1]), cache)
        tok = int(np.asarray(logits[0, -1]).argmax())
        out.append(tok)
    return out


@pytest.mark.parametrize("question_aware", [False, True])
def test_pipeline_equals_manual_steps(smollm2, question_aware):
    model, tok = smollm2
    pipe = kvjax.Pipeline(model, tok)
    s = needle_sample(tok, 400, depth=0.3)
    press = kvjax.SnapKVPress(compression_ratio=0.5, window_size=16)
    ctx_ids, q_ids = pipe.encode(s.context, s.question, answer_prefix=s.answer_prefix,
                                 question_aware=question_aware)
    assert (s.question in tok.decode(ctx_ids)) == question_aware
    res = pipe.run(s.context, s.question, press=press, max_new_tokens=6,
                   answer_prefix=s.answer_prefix, question_aware=question_aware)
    want = _greedy_by_hand(model, ctx_ids, q_ids, press, 6)
    n = len(res.tokens)
    assert res.tokens == want[:n] and (n == 6 or want[n - 1] in tok.eos_ids)
    streamed = "".join(pipe.stream(s.context, s.question, press=press, max_new_tokens=6,
                                   answer_prefix=s.answer_prefix,
                                   question_aware=question_aware))
    assert streamed == res.text


def test_full_cache_finds_needle_and_compressed_is_smaller(smollm2):
    model, tok = smollm2
    pipe = kvjax.Pipeline(model, tok)
    s = needle_sample(tok, 1000, depth=0.5, seed=3)
    full = pipe.run(s.context, s.question, answer_prefix=s.answer_prefix, max_new_tokens=10)
    assert s.answer in full.text
    comp = pipe.run(s.context, s.question, answer_prefix=s.answer_prefix, max_new_tokens=10,
                    press=kvjax.KnormPress(compression_ratio=0.75))
    f, c = kvjax.memory_report(full.cache), kvjax.memory_report(comp.cache)
    assert c.kv_bytes_held < 0.4 * f.kv_bytes_held
