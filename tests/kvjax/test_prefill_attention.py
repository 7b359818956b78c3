"""The chunked causal prefill reference (attention and its column sums) against a dense T x T
softmax written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention_scores import (prefill_attention_reference,
                                    prefill_attention_with_scores_reference, prefill_chunk)
from pallas_kernels import AllRows, LastRows, ProxyRows


def dense_attention(q, k, v, lengths, window):
    """Naive numpy attention: every query against every key, masks applied, GQA by repeat."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(h)
    qp, kp = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (kp <= qp) & ((qp - kp < window) if window else True)
    mask = mask[None, None] & (np.arange(t)[None, None, None, :] < lengths[:, None, None, None])
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows past a window see no key: NaN, unused
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqs,bsnh->bqnh", p, v)


@pytest.mark.parametrize("window", [None, 100, 300])
def test_chunked_equals_dense(window):
    t = 600  # three 256-query chunks, the last one partial
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, t, 6, 16)).astype(np.float32)
    k = rng.normal(size=(2, t, 2, 16)).astype(np.float32)
    v = rng.normal(size=(2, t, 2, 16)).astype(np.float32)
    lengths = np.array([t, 437])
    out = np.asarray(prefill_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                 jnp.asarray(lengths), sliding_window=window))
    want = dense_attention(q, k, v, lengths, window)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(out[row, :n], want[row, :n], atol=2e-5)


def test_chunk_count_is_bounded():
    assert prefill_chunk(100) == 256 and prefill_chunk(4096) == 256
    assert prefill_chunk(32768) == 2048 and -(-32768 // prefill_chunk(32768)) == 16


def dense_column_sums(q, k, lengths, window, row_weights):
    """Naive float64 numpy column sums [B, N, T]: the full T x T softmax of every row, masked
    (causal, window, valid keys), weighted by row_weights [B, T] and summed over rows."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    kk = np.repeat(k, n // k.shape[2], axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", q, kk) / np.sqrt(h)
    qp, kp = np.arange(t)[:, None], np.arange(t)[None, :]
    out = np.zeros((b, n, t))
    for row, ln in enumerate(lengths):
        ok = (kp <= qp) & (kp < ln) & ((qp - kp < window) if window else True)
        lg = np.where(ok, logits[row], -np.inf)
        p = np.where(ok, np.exp(lg - lg.max(-1, keepdims=True, initial=-1e30)), 0.0)
        p /= np.maximum(p.sum(-1, keepdims=True), 1e-30)
        out[row] = np.einsum("nqs,q->ns", p, row_weights[row])
    return out


def row_weights(rows, lengths, t):
    """[B, T] count of each row among the selected ones, counted one entry at a time."""
    w = np.zeros((len(lengths), t))
    for b, selected in enumerate(rows):
        for r in selected:
            if 0 <= r < lengths[b]:
                w[b, r] += 1
    return w


T_COLS = 600  # three 256-query chunks, the last one partial
LENGTHS = np.array([T_COLS, 437])
PROXY = [[599, 0, 5, -1, 300, 300], [436, 436, 437, 599, 3, 1]]  # -1, >= length: ignored
SELECTIONS = {  # name -> (score_rows, the rows it selects per sequence)
    "all": (AllRows(), [range(n) for n in LENGTHS]),
    "last_9": (LastRows(9), [range(n - 9, n) for n in LENGTHS]),
    "proxy": (ProxyRows(jnp.asarray(PROXY, jnp.int32)), PROXY),
}


@pytest.mark.parametrize("window", [None, 100], ids=["full", "sliding100"])
@pytest.mark.parametrize("name", list(SELECTIONS))
def test_column_sums_equal_dense(name, window):
    """Column sums of every row selection against the dense softmax, ragged lengths, with
    and without a sliding window shorter than the prompt; the output is the attention's."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, T_COLS, 6, 16)).astype(np.float32)
    k = rng.normal(size=(2, T_COLS, 2, 16)).astype(np.float32)
    v = rng.normal(size=(2, T_COLS, 2, 16)).astype(np.float32)
    score_rows, selected = SELECTIONS[name]
    args = [jnp.asarray(x) for x in (q, k, v, LENGTHS)]
    out, cols = prefill_attention_with_scores_reference(*args, sliding_window=window,
                                                        score_rows=score_rows)
    want = dense_column_sums(q, k, LENGTHS, window, row_weights(selected, LENGTHS, T_COLS))
    np.testing.assert_allclose(np.asarray(cols), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        prefill_attention_reference(*args, sliding_window=window)))


def test_no_score_rows_gives_no_column_sums():
    q = jnp.ones((1, 8, 2, 4))
    out, cols = prefill_attention_with_scores_reference(q, q[:, :, :1], q[:, :, :1],
                                                        jnp.array([5]), score_rows=None)
    assert cols is None and out.shape == q.shape


@pytest.mark.parametrize("bad", ["all", ("window", 8), np.zeros((1, 2), np.int32)],
                         ids=["str", "tuple", "array"])
def test_untyped_score_rows_are_refused(bad):
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="AllRows.*LastRows.*ProxyRows"):
        prefill_attention_with_scores_reference(q, q[:, :, :1], q[:, :, :1], jnp.array([5]),
                                                score_rows=bad)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_last_rows_window_must_be_a_positive_int(window):
    with pytest.raises(ValueError, match="window"):
        LastRows(window)
