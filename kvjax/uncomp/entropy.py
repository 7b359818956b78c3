"""Truncated matrix entropy of token matrices (UNComp, arXiv 2410.03090, section 3).

For a token matrix X [N, d] (N tokens, d features):

  1. centre over tokens, X <- X - mean_t(X), and L2-normalise every row;
  2. Sigma = X^T X / N, normalised to unit trace (+ 1e-10 I, as the official code);
  3. eigenvalues s_1 >= ... >= s_d of Sigma (`eigvalsh`, f32; they sum to 1);
  4. H_k = -sum_{i <= k} s_i log s_i / log d   (no renormalisation of the top-k mass),
     effective rank = exp(-sum_i s_i log s_i)   (all d eigenvalues, in nats).

Reference values: for an isotropic Gaussian with N >> d every s_i -> 1/d, so
H_k -> -k (1/d) log(1/d) / log d = k / d and the effective rank -> d (for finite N the
top-k sample eigenvalues exceed 1/d by O(sqrt(d/N)), Marchenko-Pastur, so H_k sits slightly
above). A rank-one matrix (every row a multiple of one vector) has s = (1, 0, ..., 0), so
H_k = 0 and the effective rank is 1.
All functions are pure, jit-able and batch over leading axes (heads, layers).
"""

import jax
import jax.numpy as jnp

EPS = 1e-10


def matrix_spectrum(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Eigenvalues (descending, sum 1) of the trace-normalised covariance of rows of x.

    Args:
      x: [..., N, d] token matrices; mask: [..., N] bool, False rows are ignored (padding).

    Returns:
      [..., d] f32 eigenvalues, clipped at 0, largest first.
    """
    x = x.astype(jnp.float32)
    w = jnp.ones(x.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w, axis=-1), 1.0)[..., None, None]  # [..., 1, 1]
    mean = jnp.sum(x * w[..., None], axis=-2, keepdims=True) / n
    xc = x - mean
    norm = jnp.linalg.norm(xc, axis=-1, keepdims=True)
    xc = xc / jnp.maximum(norm, 1e-12) * w[..., None]
    cov = jnp.einsum("...ni,...nj->...ij", xc, xc) / n
    trace = jnp.trace(cov, axis1=-2, axis2=-1)[..., None, None]
    d = x.shape[-1]
    cov = cov / jnp.maximum(trace, 1e-30) + EPS * jnp.eye(d, dtype=jnp.float32)
    s = jnp.linalg.eigvalsh(cov)[..., ::-1]
    return jnp.maximum(s, 0.0)


def _plogp(s: jax.Array) -> jax.Array:
    return jnp.where(s > 0, s * jnp.log(jnp.where(s > 0, s, 1.0)), 0.0)


def truncated_entropy(x: jax.Array, k: int = 32, mask: jax.Array | None = None) -> jax.Array:
    """H_k of token matrices x [..., N, d] -> [...] in [0, k/d-ish]; see the module docstring.

    Raises ValueError when k is not in [1, d].
    """
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"truncation k={k} must be in [1, d={d}] (the feature dimension)")
    s = matrix_spectrum(x, mask)
    return -jnp.sum(_plogp(s[..., :k]), axis=-1) / jnp.log(float(d))


def effective_rank(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """exp of the untruncated matrix entropy (nats) of x [..., N, d] -> [...] in [1, d]."""
    s = matrix_spectrum(x, mask)
    return jnp.exp(-jnp.sum(_plogp(s), axis=-1))


def spectrum_entropies(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(H_k, effective rank) from an already computed spectrum s [..., d]."""
    d = s.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"truncation k={k} must be in [1, d={d}] (the feature dimension)")
    return (-jnp.sum(_plogp(s[..., :k]), axis=-1) / jnp.log(float(d)),
            jnp.exp(-jnp.sum(_plogp(s), axis=-1)))
