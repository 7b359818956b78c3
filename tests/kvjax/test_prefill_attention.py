"""The chunked causal prefill attention against a dense T x T softmax written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import prefill_attention_reference, prefill_chunk


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


def test_causal_column_sums_equal_dense():
    """H2O column sums (ObservedAttention) against the dense softmax, three query chunks."""
    from kvjax.observation import causal_column_sums
    t = 600
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, t, 6, 16)).astype(np.float32)
    k = rng.normal(size=(2, t, 2, 16)).astype(np.float32)
    lengths = np.array([t, 437])
    got = np.asarray(causal_column_sums(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths)))
    kk = np.repeat(k, 3, axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", q, kk) / 4.0
    for row, n in enumerate(lengths):
        lg = np.where(np.tril(np.ones((n, n), bool)), logits[row, :, :n, :n], -np.inf)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(got[row, :, :n], p.sum(1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[row, :, n:], 0.0)


def test_fused_column_sums_equal_standalone():
    from kvjax.attention import prefill_attention_and_column_sums
    from kvjax.observation import causal_column_sums
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 300, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 300, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 300, 2, 8)), jnp.float32)
    lengths = jnp.array([300, 123])
    out, cols = prefill_attention_and_column_sums(q, k, v, lengths)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(prefill_attention_reference(q, k, v, lengths)))
    np.testing.assert_allclose(np.asarray(cols), np.asarray(causal_column_sums(q, k, lengths)),
                               atol=1e-5)
