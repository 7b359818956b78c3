"""What a layer hands the compressor after prefill (ARCHITECTURE.md section 2).

Keys and values are the layer's uncompressed prefix itself; the observation adds what only
the prefill can see cheaply: post-RoPE queries of the last W prompt positions of every
sequence and, for presses that ask for them, column sums of the causal attention.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    """Static description of what presses need observed.

    Attributes:
      window: W, number of last prompt positions whose queries are kept (0 = none).
      column_sums: whether to compute column sums of the causal attention probabilities over
        all query rows (H2O / ObservedAttention), in key chunks, never T x T at once.
    """

    window: int = 0
    column_sums: bool = False

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"{self.window=} must be >= 0")

    def merge(self, other: "ObsSpec") -> "ObsSpec":
        return ObsSpec(window=max(self.window, other.window),
                       column_sums=self.column_sums or other.column_sums)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Per-layer prefill statistics.

    Attributes:
      q_window: [B, W, N, H] post-RoPE queries of positions length-W .. length-1, or None.
      window_valid: [B, W] False where length - W + w < 0 (prompt shorter than W).
      column_sums: [B, N, T] sum over query rows of causal attention probabilities, or None.
    """

    q_window: jax.Array | None = None
    window_valid: jax.Array | None = None
    column_sums: jax.Array | None = None


def gather_window(q: jax.Array, lengths: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Queries of the last `window` valid positions of each right-padded sequence.

    Args:
      q: [B, T, N, H]; lengths: [B].

    Returns:
      q_window [B, W, N, H] and window_valid [B, W].
    """
    idx = lengths[:, None] - window + jnp.arange(window)[None, :]  # [B, W]
    valid = idx >= 0
    idx = jnp.clip(idx, 0, q.shape[1] - 1)
    return jnp.take_along_axis(q, idx[:, :, None, None], axis=1), valid


def causal_column_sums(q: jax.Array, k: jax.Array, lengths: jax.Array, *,
                       scale: float | None = None, chunk: int = 512) -> jax.Array:
    """Column sums of causal softmax attention over all valid query rows, per query head.

    Two passes over key chunks (row log-sum-exp, then column sums), so memory is
    O(T * chunk) per head, never T x T.

    Args:
      q: [B, T, N, H]; k: [B, T, K, H]; lengths: [B].

    Returns:
      [B, N, T] f32; entry t is sum_i softmax_i(t) over valid rows i >= t.
    """
    b, t, n, h = q.shape
    n_kv = k.shape[2]
    scale = default_scale(h) if scale is None else scale
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qg = q.reshape(b, t, n_kv, n // n_kv, h)
    q_pos = jnp.arange(t)
    row_valid = q_pos[None, :] < lengths[:, None]  # [B, T]

    def block_logits(i):
        kb = jax.lax.dynamic_slice_in_dim(kp, i * chunk, chunk, axis=1)  # [B, Sc, K, H]
        k_pos = i * chunk + jnp.arange(chunk)
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, kb,
                            preferred_element_type=jnp.float32) * scale
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < t)
        mask = mask[None] & (k_pos[None, None, :] < lengths[:, None, None])  # [B, T, Sc]
        return jnp.where(mask[:, None, None], logits, -jnp.inf)

    def lse_step(carry, i):
        m, s = carry
        lg = block_logits(i)
        m_new = jnp.maximum(m, jnp.max(lg, -1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(lg - m_new[..., None]), -1)
        return (m_new, s), None

    init = (jnp.full((b, n_kv, n // n_kv, t), -jnp.inf), jnp.zeros((b, n_kv, n // n_kv, t)))
    (m, s), _ = jax.lax.scan(lse_step, init, jnp.arange(n_chunks))
    lse = m + jnp.log(s)  # every row sees at least key 0
    rows = row_valid[:, None, None, :, None]

    def col_block(i):
        p = jnp.exp(block_logits(i) - lse[..., None])
        return jnp.sum(jnp.where(rows, p, 0.0), axis=3)  # [B, K, G, Sc]

    cols = jax.lax.map(col_block, jnp.arange(n_chunks))  # [n_chunks, B, K, G, Sc]
    cols = jnp.moveaxis(cols, 0, 3).reshape(b, n_kv, n // n_kv, n_chunks * chunk)[..., :t]
    return cols.reshape(b, n, t)


def observe(q: jax.Array, k: jax.Array, lengths: jax.Array, spec: ObsSpec, *,
            scale: float | None = None) -> Observation:
    """Build the Observation that `spec` asks for from one layer's prefill q and k."""
    q_window = window_valid = column_sums = None
    if spec.window:
        q_window, window_valid = gather_window(q, lengths, spec.window)
    if spec.column_sums:
        column_sums = causal_column_sums(q, k, lengths, scale=scale)
    return Observation(q_window=q_window, window_valid=window_valid, column_sums=column_sums)
