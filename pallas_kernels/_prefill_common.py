"""Row selection, padding and block-skipping tables shared by the prefill-with-scores kernels.

`ScoreRows` (AllRows / LastRows / ProxyRows) says which query rows' probabilities the column
sums add up; the kernels and their jnp reference (`kvjax.attention_scores`) resolve it with
`score_row_positions`.

Both backends compute column sums in two passes: a flash-attention forward that also writes the
log-sum-exp of every query row, then a pass over (key block, row block) pairs that recomputes
the logits of the selected rows only and sums exp(logit - lse) over rows. Pairs that causality
or the sliding window mask entirely are skipped; the tables here say which.
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


def check_prefill_args(q, k, v, lengths, scale) -> float:
    """Validate shapes of q [B, T, N, H], k, v [B, T, K, H], lengths [B]; return the scale."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{q.shape=}, {k.shape=}, {v.shape=} must be [B, T, heads, H]")
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or k.shape != v.shape or k.shape[3] != h:
        raise ValueError(f"{k.shape=} and {v.shape=} must be [B={b}, T={t}, K, H={h}]")
    if n % k.shape[2]:
        raise ValueError(f"N={n} query heads must be a multiple of K={k.shape[2]} kv heads")
    if lengths.shape != (b,):
        raise ValueError(f"{lengths.shape=} must be ({b},)")
    return 1.0 / math.sqrt(h) if scale is None else float(scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AllRows:
    """Every valid query row (H2O / ObservedAttention)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LastRows:
    """The last `window` valid query rows of each sequence (SnapKV family); static."""

    window: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        w = self.window
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
            raise ValueError(f"LastRows: {self.window=} must be an int >= 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProxyRows:
    """Given query rows (NACL proxies): rows [B, P] int; entries < 0 or >= length are
    ignored and a row listed twice counts twice. Traced under jit."""

    rows: jax.Array


# Which query rows' attention probabilities are summed into column sums. All three are
# pytrees: AllRows and LastRows carry no arrays (their window is static), ProxyRows' rows
# are traced, so a kernel takes `score_rows` as an ordinary jit argument.
ScoreRows = AllRows | LastRows | ProxyRows


def check_score_rows(score_rows: ScoreRows | None) -> ScoreRows | None:
    """Return `score_rows` if it is None or a ScoreRows; refuse anything else."""
    if score_rows is None or isinstance(score_rows, (AllRows, LastRows, ProxyRows)):
        return score_rows
    shape = getattr(score_rows, "shape", None)  # an array: name it, don't print it
    what = repr(score_rows) if shape is None else f"<{type(score_rows).__name__} {shape}>"
    raise ValueError(f"score_rows={what} must be None, AllRows(), LastRows(window) or "
                     f"ProxyRows(rows [B, P]) (pallas_kernels._prefill_common)")


def score_row_positions(score_rows: ScoreRows, lengths: jax.Array,
                        t: int) -> tuple[jax.Array, jax.Array]:
    """Resolve `score_rows` to row positions and their validity.

    Shared by the kernels and their jnp reference (`kvjax.attention_scores`), which imports it
    from here (kvjax depends on pallas_kernels, never the reverse).

    Args:
      score_rows: AllRows() | LastRows(W) | ProxyRows(rows [B, P]).
      lengths: [B] valid prompt lengths.
      t: padded prompt length T.

    Returns:
      rows [B, P] int32 (clipped into [0, T); P = T, W or P) and valid [B, P] bool (the
      position is in [0, length)).
    """
    b = lengths.shape[0]
    if isinstance(score_rows, AllRows):
        rows = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    elif isinstance(score_rows, LastRows):
        w = score_rows.window
        rows = lengths[:, None].astype(jnp.int32) - w + jnp.arange(w, dtype=jnp.int32)[None]
    elif isinstance(score_rows, ProxyRows):
        rows = jnp.asarray(score_rows.rows)
        if rows.ndim != 2 or rows.shape[0] != b or not jnp.issubdtype(rows.dtype, jnp.integer):
            raise ValueError(f"ProxyRows: rows.shape={rows.shape}, rows.dtype={rows.dtype} "
                             f"must be an int array [B={b}, P]")
        rows = rows.astype(jnp.int32)
    else:
        raise ValueError(f"{score_rows=} must be AllRows(), LastRows(window) or "
                         f"ProxyRows(rows [B, P])")
    valid = (rows >= 0) & (rows < lengths[:, None])
    return jnp.clip(rows, 0, t - 1), valid


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Right-pad `axis` of x to `size` with `value`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def key_block_range(i, block_q, block_k, length, sliding_window):
    """First and last key block that query block i needs (causal, window, valid keys).

    Uses lax.div (operands are >= 0): floor division lowers to sign ops Mosaic may not take.
    """
    q_lo, q_hi = i * block_q, (i + 1) * block_q - 1
    last = jax.lax.div(jnp.minimum(q_hi, jnp.maximum(length - 1, 0)), block_k)
    if sliding_window is None:
        return jnp.zeros_like(last), last
    first = jax.lax.div(jnp.maximum(q_lo - sliding_window + 1, 0), block_k)
    return jnp.minimum(first, last), last


def block_needed(r_min, r_max, j, block_k, sliding_window):
    """Whether a row block (rows' min/max valid position) meets key block j unmasked.

    Causal: some row p >= j*block_k; window: some row p with p - (j+1)*block_k + 1 < window.
    Conservative (the two rows may differ); the kernels mask exactly anyway.
    """
    needed = r_max >= j * block_k
    if sliding_window is not None:
        needed &= r_min - (j * block_k + block_k - 1) < sliding_window
    return needed


def row_block_tables(rows, valid, block_r, n_key_blocks, block_k, sliding_window):
    """Per-row-block bounds and, per key block, the first row block that it needs.

    Args:
      rows, valid: [B, P_pad] selected row positions and validity (P_pad % block_r == 0).

    Returns:
      r_min, r_max [B, nr] int32 (min / max valid row position; r_max = -1 when the block has
      no valid row), first and last [B, nk] int32 (first and last needed row block for each
      key block; last = first - 1 when none), so that kernels visit only [first, last].
    """
    b = rows.shape[0]
    r = rows.reshape(b, -1, block_r)
    ok = valid.reshape(b, -1, block_r)
    r_max = jnp.max(jnp.where(ok, r, -1), axis=-1).astype(jnp.int32)  # [B, nr]
    r_min = jnp.min(jnp.where(ok, r, jnp.iinfo(jnp.int32).max // 2), axis=-1).astype(jnp.int32)
    j = jnp.arange(n_key_blocks, dtype=jnp.int32)[None, :, None]
    needed = block_needed(r_min[:, None, :], r_max[:, None, :], j, block_k, sliding_window)
    any_needed = jnp.any(needed, -1)
    first = jnp.where(any_needed, jnp.argmax(needed, -1), 0).astype(jnp.int32)
    n_rb = needed.shape[-1]
    last = jnp.where(any_needed, n_rb - 1 - jnp.argmax(needed[..., ::-1], -1), -1)
    return r_min, r_max, first, last.astype(jnp.int32)
