"""The shared-prefill engine answers exactly as `Pipeline.run`; perplexity with the full cache
equals the NLL of a plain forward pass; compression changes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import char_tokenizer, tiny_model

import kvjax
from kvjax.eval.engine import answer_sample, group_by_spec
from kvjax.eval.perplexity import corpus_ids, perplexities
from kvjax.eval.tasks import make_sample


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    model = tiny_model()
    return model, tok, kvjax.Pipeline(model, tok)


def test_group_by_spec():
    snap = kvjax.SnapKVPress(compression_ratio=0.5)
    presses = [None, snap, kvjax.KnormPress(compression_ratio=0.5),
               kvjax.SnapKVPress(compression_ratio=0.75), kvjax.TOVAPress(compression_ratio=0.5)]
    groups = group_by_spec(presses)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert [0, 2] in groups and [1, 3] in groups  # no observations / SnapKV window 64


@pytest.mark.parametrize("question_aware, presses", [
    (False, (None, "streaming_llm", "snapkv")),  # None and StreamingLLM share one prefill
    (True, ("snapkv",)),
])
def test_answers_equal_pipeline_run(tiny, question_aware, presses):
    _, tok, pipe = tiny
    sample = make_sample("niah_single", tok, 256, index=2)
    presses = [p and kvjax.make_press(p, 0.5) for p in presses]
    answers = answer_sample(pipe, sample, presses, question_aware=question_aware)
    for press, got in zip(presses, answers):
        ref = pipe.run(sample.context, sample.question, max_new_tokens=sample.max_new_tokens,
                       press=press, answer_prefix=sample.answer_prefix,
                       question_aware=question_aware)
        assert got.tokens == tuple(ref.tokens) and got.text == ref.text
        report = kvjax.memory_report(ref.cache)
        assert (got.kv_bytes_needed, got.bytes_held) == (report.kv_bytes_needed,
                                                         report.bytes_held)
        assert (got.n_context, got.n_question) == (ref.n_context, ref.n_question)
        assert got.context_kv_bytes < got.kv_bytes_needed  # the question and answer add entries
    if not question_aware:
        assert answers[1].context_kv_bytes < answers[0].context_kv_bytes


def _forward_nll(model, ids, n_context, n_score):
    """Independent reference: one plain forward over the whole text, teacher-forced NLL."""
    logits = model(jnp.asarray([ids[:n_context + n_score]]))[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = np.asarray(ids[n_context:n_context + n_score])
    return -np.asarray(logp[np.arange(n_context - 1, n_context + n_score - 1), targets])


def test_perplexity_full_cache_matches_forward_pass(tiny):
    model, tok, _ = tiny
    fn, params = model.kvjax_split()
    ids = corpus_ids(tok, 300, seed=0)
    full, snap0, snap, stream = perplexities(
        fn, params, ids, 200, 100,
        [None, kvjax.SnapKVPress(compression_ratio=0.0),
         kvjax.SnapKVPress(compression_ratio=0.75), kvjax.StreamingLLMPress(compression_ratio=0.75)],
        chunk=32)
    ref = _forward_nll(model, ids, 200, 100)
    np.testing.assert_allclose(full.nll, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(snap0.nll, full.nll, rtol=1e-5, atol=1e-5)
    for compressed in (snap, stream):
        assert np.isfinite(compressed.nll).all() and not np.allclose(compressed.nll, full.nll)
        assert compressed.kv_bytes_needed < full.kv_bytes_needed
    assert full.perplexity == pytest.approx(np.exp(ref.mean()), rel=1e-4)


def test_perplexity_bad_inputs(tiny):
    model, tok, _ = tiny
    fn, params = model.kvjax_split()
    ids = corpus_ids(tok, 100)
    with pytest.raises(ValueError, match="len"):
        perplexities(fn, params, ids, 90, 20, [None])
    with pytest.raises(ValueError, match="n_score"):
        perplexities(fn, params, ids, 50, 1, [None])
    with pytest.raises(ValueError, match="corpus"):
        corpus_ids(tok, 10 ** 7)
    assert corpus_ids(tok, 50, seed=3) == corpus_ids(tok, 50, seed=3) != corpus_ids(tok, 50, 4)
