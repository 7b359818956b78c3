"""The long-generation task: teacher-forced perplexity while a DecodingPress keeps compressing.

The chunked scorer (one `compression_interval` of tokens per call, a merge after each) is
checked against a token-by-token decode whose hook merges when the decode loop would; the
kept share against the budget rule by hand; the eval grid end to end on a tiny model."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import char_tokenizer, tiny_model

import kvjax
from kvjax import loops
from kvjax.eval.perplexity import corpus_ids, perplexities
from kvjax.eval.runner import Grid, check_decode_scorers, kvjax_rows, run_grid
from kvjax.kvzap import UntrainedWeights

N_CONTEXT, N_SCORE, INTERVAL = 100, 90, 16


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    model = tiny_model()
    return model, tok, corpus_ids(tok, N_CONTEXT + N_SCORE, seed=1)


def _token_by_token(model, ids, press, hook):
    """NLL of ids[N_CONTEXT:] feeding one token per decode step, the hook's `after_step`
    after each (what kvjax.generate's loop does), and the last cache."""
    fn, params = model.kvjax_split()
    plan = kvjax.plan.plan_request(fn, [ids[:N_CONTEXT]], max_new_tokens=N_SCORE, press=press,
                                   decoding_press=hook)
    logits, cache = kvjax.prefill.prefill_request(fn, params, plan)
    step = jax.jit(lambda p, tok, c: fn.decode(p, tok, jnp.array([1]), c))
    after = jax.jit(lambda c: c.hook.after_step(c))
    nll = []
    for i in range(N_CONTEXT, N_CONTEXT + N_SCORE):
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0])
        nll.append(-float(logp[ids[i]]))
        if i == N_CONTEXT + N_SCORE - 1:
            break
        step_logits, cache = step(params, jnp.asarray([[ids[i]]]), cache)
        logits = step_logits[:, 0]
        cache = after(cache)
    return np.asarray(nll), cache


SCORERS = {"keydiff": kvjax.KeyDiffPress, "tova": kvjax.TOVAPress,
           "observed_attention": kvjax.ObservedAttentionPress,
           "kvzap": lambda **kw: kvjax.KVzapPress(weights=UntrainedWeights(seed=2),
                                                  allocation="uniform", **kw)}


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_chunks_equal_token_by_token_decoding(tiny, scorer):
    model, _, ids = tiny
    fn, params = model.kvjax_split()
    press = SCORERS[scorer](compression_ratio=0.5)
    hook = kvjax.DecodingPress(press=SCORERS[scorer](), compression_interval=INTERVAL,
                               budget=kvjax.RatioOfSeen(0.5))
    (got,) = perplexities(fn, params, ids, N_CONTEXT, N_SCORE, [press], hooks=[hook])
    want, cache = _token_by_token(model, ids, press, hook)
    np.testing.assert_allclose(got.nll, want, rtol=2e-4, atol=2e-4)
    # by hand: the last merge kept ceil(0.5 m) of the m tokens seen then; the tail holds the rest
    seen = N_CONTEXT + N_SCORE - 1
    m = N_CONTEXT + (N_SCORE - 1) // INTERVAL * INTERVAL
    assert int(cache.next_pos[0]) == seen
    assert got.kept_share == pytest.approx((math.ceil(0.5 * m) + seen - m) / seen)


def test_full_cache_is_unchanged_by_the_hook_argument(tiny):
    model, _, ids = tiny
    fn, params = model.kvjax_split()
    plain, hooked = perplexities(fn, params, ids, N_CONTEXT, N_SCORE, [None, None],
                                 hooks=[None, None])
    np.testing.assert_array_equal(plain.nll, hooked.nll)
    assert plain.kept_share == 1.0
    with pytest.raises(ValueError, match="len"):
        perplexities(fn, params, ids, N_CONTEXT, N_SCORE, [None], hooks=[None, None])


def test_ring_decode_is_refused_for_chunks(tiny):
    model, _, ids = tiny
    fn, params = model.kvjax_split()
    with pytest.raises(ValueError, match="RingDecode re-selects every token"):
        perplexities(fn, params, ids, N_CONTEXT, N_SCORE,
                     [kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)],
                     hooks=[kvjax.RingDecode(window_size=4)])


def test_eval_grid_long_generation(tiny, tmp_path):
    model, tok, _ = tiny
    pipe = kvjax.Pipeline(model, tok)
    grid = Grid(tasks=("long_generation",), lengths=(100,), presses=("full", "keydiff"),
                ratios=(0.5, 0.75), samples=1)
    check_decode_scorers(grid)
    rows = kvjax_rows(pipe, tok, 0, long_tokens=N_SCORE, interval=INTERVAL)
    summary = run_grid(grid, rows, tmp_path, meta={"library": "kvjax"}, progress=False)
    cells = {(c["cell"]["press"], c["cell"]["ratio"]): c
             for c in json.loads((tmp_path / "summary.json").read_text())}
    assert cells[("full", 0.0)]["kept_share"] == 1.0
    half, quarter = cells[("keydiff", 0.5)], cells[("keydiff", 0.75)]
    assert quarter["kept_share"] < half["kept_share"] < 1.0
    ids = corpus_ids(tok, 100 + N_SCORE, 0, 0)
    fn, params = model.kvjax_split()
    (ref,) = perplexities(fn, params, ids, 100, N_SCORE,
                          [kvjax.KeyDiffPress(compression_ratio=0.5)],
                          hooks=[kvjax.DecodingPress(press=kvjax.KeyDiffPress(),
                                                     compression_interval=INTERVAL,
                                                     budget=kvjax.RatioOfSeen(0.5))])
    assert half["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert "kept % of the tokens seen" in summary.read_text()
    bad = Grid(tasks=("long_generation",), lengths=(100,), presses=("snapkv",), ratios=(0.5,),
               samples=1)
    with pytest.raises(ValueError, match="long_generation, press 'snapkv': SnapKVPress needs"):
        check_decode_scorers(bad)
