"""Truncated matrix entropy: closed-form cases, a float64 numpy reference, masks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.uncomp.entropy import effective_rank, truncated_entropy


def numpy_reference(x, k):
    x = x.astype(np.float64)
    x = x - x.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cov = x.T @ x / len(x)
    cov = cov / np.trace(cov) + 1e-10 * np.eye(x.shape[1])
    s = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    plogp = np.where(s > 0, s * np.log(np.where(s > 0, s, 1)), 0)
    return -plogp[:k].sum() / np.log(x.shape[1]), np.exp(-plogp.sum())


def test_isotropic_gaussian_gives_k_over_d():
    """H_k -> k/d as N/d grows; the top-k sample eigenvalues exceed 1/d by O(sqrt(d/N))
    (Marchenko-Pastur), so the finite-N value sits slightly above and converges."""
    errs = []
    for n in (2048, 32768):
        x = jax.random.normal(jax.random.key(0), (n, 64))
        errs.append(float(truncated_entropy(x, 32)) - 32 / 64)
    assert 0 < errs[1] < errs[0] < 0.1 and errs[1] < 0.02
    x = jax.random.normal(jax.random.key(0), (8192, 64))
    assert abs(float(truncated_entropy(x, 8)) - 8 / 64) < 0.02
    assert 0.95 * 64 < float(effective_rank(x)) <= 64


def test_rank_one_is_zero():
    u = jax.random.normal(jax.random.key(1), (300, 1))
    v = jax.random.normal(jax.random.key(2), (1, 48))
    x = u @ v + 3.0  # an offset is removed by centring
    assert float(truncated_entropy(x, 32)) < 1e-3
    assert abs(float(effective_rank(x)) - 1.0) < 1e-2


def test_matches_float64_reference_batched():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 2, 100, 32) * rng.rand(1, 1, 1, 32) * 3 + rng.randn(3, 2, 1, 32)
    h = np.asarray(truncated_entropy(jnp.asarray(x, jnp.float32), 16))
    r = np.asarray(effective_rank(jnp.asarray(x, jnp.float32)))
    for i in np.ndindex(3, 2):
        ref_h, ref_r = numpy_reference(x[i], 16)
        np.testing.assert_allclose(h[i], ref_h, atol=2e-5)
        np.testing.assert_allclose(r[i], ref_r, rtol=1e-4)


def test_mask_ignores_padding_and_jit_vmap():
    rng = np.random.RandomState(1)
    x = rng.randn(50, 16).astype(np.float32)
    padded = np.concatenate([x, 100 * rng.randn(14, 16).astype(np.float32)])
    mask = np.arange(64) < 50
    a = truncated_entropy(jnp.asarray(x), 8)
    b = jax.jit(truncated_entropy, static_argnums=1)(jnp.asarray(padded), 8, jnp.asarray(mask))
    np.testing.assert_allclose(a, b, atol=1e-5)
    batch = jax.vmap(lambda y: truncated_entropy(y, 8))(jnp.stack([x, x[::-1]]))
    np.testing.assert_allclose(batch, [a, a], atol=1e-5)


def test_k_larger_than_dim_is_an_error():
    with pytest.raises(ValueError, match="k=65 must be in"):
        truncated_entropy(jnp.ones((10, 64)), 65)
