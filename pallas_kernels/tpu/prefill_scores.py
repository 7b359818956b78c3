"""Causal prefill attention that also emits attention column sums: Mosaic TPU kernels.

Pass 1 (`_fwd_kernel`) is flash attention over a right-padded prompt (GQA by index map,
sliding window, ragged lengths) that also writes each row's log-sum-exp. Pass 2
(`_colsum_kernel`) visits (key block, selected-row block) pairs, recomputes the transposed
logits k @ q_rows^T, and sums exp(logit - lse) over rows; pairs that causality or the window
mask entirely are skipped (no compute, and their DMA is elided where the index map repeats a
block). The T x T matrix is never materialised. Selected rows are all rows (H2O), the last W
rows (SnapKV) or given proxy rows (NACL).

Spec: `kvjax.attention_scores.prefill_attention_with_scores_reference`.
Axis letters: B batch, T prompt, N q heads, K kv heads, G = N // K, H head dim, P rows.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _interpret
from pallas_kernels._prefill_common import (AllRows, ScoreRows, block_needed,
                                            check_prefill_args, check_score_rows,
                                            key_block_range, pad_axis, round_up,
                                            row_block_tables, score_row_positions)

_NEG = -1e30
_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query, key and selected-row block sizes (multiples of 128, the lane width)."""

    block_q: int = 512
    block_k: int = 512
    block_rows: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_rows"):
            val = getattr(self, name)
            if val < _LANES or val % _LANES:
                raise ValueError(f"{name}={val} must be a positive multiple of {_LANES}")


def _dot(a, b, contract):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _col_to_row(x):
    """[n, 1] -> [1, n] via a lane broadcast and a 2-D transpose (Mosaic-friendly)."""
    return jnp.transpose(jnp.broadcast_to(x, (x.shape[0], _LANES)))[:1]


def _fwd_kernel(len_ref,  # scalar prefetch: [B] int32 (SMEM)
                q_ref,  # [bq, H]
                k_ref, v_ref,  # [bk, H]
                o_ref,  # [bq, H]
                lse_ref,  # [1, bq] f32
                m_ref, l_ref, acc_ref,  # scratch [bq, 1], [bq, 1], [bq, H] f32
                *, scale, bq, bk, sliding_window):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = len_ref[b]
    first, last = key_block_range(i, bq, bk, length, sliding_window)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j <= last))
    def _step():
        s = _dot(q_ref[...], k_ref[...], ((1,), (1,))) * scale  # [bq, bk]
        q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        valid = (k_pos <= q_pos) & (k_pos < length)
        if sliding_window is not None:
            valid &= q_pos - k_pos < sliding_window
        s = jnp.where(valid, s, _NEG)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + _dot(p, v_ref[...].astype(jnp.float32),
                                                   ((1,), (0,)))
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.maximum(l, 1e-30), 0.0).astype(o_ref.dtype)
        lse = jnp.where(l > 0, m_ref[...] + jnp.log(jnp.maximum(l, 1e-30)), jnp.inf)
        lse_ref[...] = _col_to_row(lse)


def _fwd(qt, kt, vt, lengths, *, scale, bq, bk, sliding_window, interpret):
    """qt [B, N, Tp, H], kt, vt [B, K, Tp, H] -> o [B, N, Tp, H], lse [B, N, 1, Tp]."""
    b, n, tp, h = qt.shape
    g = n // kt.shape[1]

    def kv_map(bi, ni, i, j, len_ref):
        first, last = key_block_range(i, bq, bk, len_ref[bi], sliding_window)
        return bi, jax.lax.div(ni, g), jnp.clip(j, first, last), 0

    def q_map(bi, ni, i, j, len_ref):
        return bi, ni, i, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, n, tp // bq, tp // bk),
        in_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                  pl.BlockSpec((None, None, bk, h), kv_map),
                  pl.BlockSpec((None, None, bk, h), kv_map)],
        out_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                   pl.BlockSpec((None, None, 1, bq), lambda bi, ni, i, j, _: (bi, ni, 0, i))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)])
    kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk,
                               sliding_window=sliding_window)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, tp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(lengths, qt, kt, vt)


def _colsum_kernel(rmin_ref, rmax_ref, first_ref, len_ref,  # scalar prefetch (SMEM)
                   q_ref,  # [br, H] selected query rows
                   k_ref,  # [bk, H]
                   lse_ref,  # [1, br] f32 (+inf on rows that do not count)
                   rpos_ref,  # [1, br] int32 row positions
                   o_ref,  # [1, bk] f32 column sums
                   acc_ref,  # scratch [bk, 1] f32
                   *, scale, bk, n_kb, n_rb, sliding_window):
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(r == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(block_needed(rmin_ref[b * n_rb + r], rmax_ref[b * n_rb + r], j, bk,
                          sliding_window))
    def _step():
        br = q_ref.shape[0]
        s = _dot(k_ref[...], q_ref[...], ((1,), (1,))) * scale  # [bk, br] (transposed logits)
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, br), 0)
        r_pos = jnp.broadcast_to(rpos_ref[...], (bk, br))
        valid = (k_pos <= r_pos) & (k_pos < len_ref[b])
        if sliding_window is not None:
            valid &= r_pos - k_pos < sliding_window
        p = jnp.where(valid, jnp.exp(jnp.where(valid, s, _NEG) - lse_ref[...]), 0.0)
        acc_ref[...] += jnp.sum(p, axis=1, keepdims=True)

    @pl.when(r == n_rb - 1)
    def _finish():
        o_ref[...] = _col_to_row(acc_ref[...])


def _colsums(q_rows, kt, lse_rows, row_pos, tables, lengths, *, scale, bk, br,
             sliding_window, interpret):
    """q_rows [B, N, Pp, H], kt [B, K, Tp, H], lse_rows [B, N, 1, Pp], row_pos [B, 1, Pp]."""
    b, n, pp, h = q_rows.shape
    tp = kt.shape[2]
    g, n_kb, n_rb = n // kt.shape[1], tp // bk, pp // br

    def row_map(bi, ni, j, r, rmin_ref, rmax_ref, first_ref, len_ref):  # skip unneeded blocks
        return bi, ni, jnp.maximum(r, first_ref[bi * n_kb + j]), 0

    def row_vec_map(bi, ni, j, r, rmin_ref, rmax_ref, first_ref, len_ref):
        return bi, ni, 0, jnp.maximum(r, first_ref[bi * n_kb + j])

    def pos_map(*args):
        bi, _, _, blk = row_vec_map(*args)
        return bi, 0, blk

    def k_map(bi, ni, j, r, *_):
        return bi, jax.lax.div(ni, g), j, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, n, n_kb, n_rb),
        in_specs=[pl.BlockSpec((None, None, br, h), row_map),
                  pl.BlockSpec((None, None, bk, h), k_map),
                  pl.BlockSpec((None, None, 1, br), row_vec_map),
                  pl.BlockSpec((None, 1, br), pos_map)],
        out_specs=pl.BlockSpec((None, None, 1, bk), lambda bi, ni, j, r, *_: (bi, ni, 0, j)),
        scratch_shapes=[pltpu.VMEM((bk, 1), jnp.float32)])
    kernel = functools.partial(_colsum_kernel, scale=scale, bk=bk, n_kb=n_kb, n_rb=n_rb,
                               sliding_window=sliding_window)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, n, 1, tp), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*(x.reshape(-1) for x in tables), lengths, q_rows, kt, lse_rows, row_pos)


def _select_rows(qt, lse, rows, valid, br):
    """Gather the selected rows of qt [B, N, Tp, H] and lse [B, N, 1, Tp], padded to br."""
    pp = round_up(rows.shape[1], br)
    rows, valid = pad_axis(rows, 1, pp), pad_axis(valid, 1, pp, False)
    q_rows = jnp.take_along_axis(qt, rows[:, None, :, None], axis=2)
    lse_rows = jnp.take_along_axis(lse, rows[:, None, None, :], axis=3)
    lse_rows = jnp.where(valid[:, None, None, :], lse_rows, jnp.inf)
    return q_rows, lse_rows, rows, valid


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "block_sizes",
                                             "interpret"))
def _prefill(q, k, v, lengths, score_rows, *, scale, sliding_window, block_sizes, interpret):
    bs = block_sizes
    t = q.shape[1]
    blk = min(max(bs.block_q, bs.block_k), round_up(t, _LANES))
    bq, bk = min(bs.block_q, blk), min(bs.block_k, blk)
    tp = round_up(t, max(bq, bk))
    if tp % bq or tp % bk:
        raise ValueError(f"{bs=} block_q and block_k must divide each other")
    qt = pad_axis(q, 1, tp).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
    kt, vt = (pad_axis(x, 1, tp).transpose(0, 2, 1, 3) for x in (k, v))
    lengths = lengths.astype(jnp.int32)
    interpret = _interpret.tpu_interpret(interpret)
    o, lse = _fwd(qt, kt, vt, lengths, scale=scale, bq=bq, bk=bk,
                  sliding_window=sliding_window, interpret=interpret)
    if score_rows is None:
        return o.transpose(0, 2, 1, 3)[:, :t], None
    rows, valid = score_row_positions(score_rows, lengths, t)
    br = min(bs.block_rows, round_up(rows.shape[1], _LANES))
    q_rows, lse_rows, rows, valid = _select_rows(qt, lse, rows, valid, br)
    tables = row_block_tables(rows, valid, br, tp // bk, bk, sliding_window)[:3]
    cols = _colsums(q_rows, kt, lse_rows, rows[:, None, :], tables, lengths,
                    scale=scale, bk=bk, br=br, sliding_window=sliding_window,
                    interpret=interpret)
    return o.transpose(0, 2, 1, 3)[:, :t], cols[:, :, 0, :t]


def prefill_attention_with_scores(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                                  *, scale: float | None = None,
                                  sliding_window: int | None = None,
                                  score_rows: ScoreRows | None = AllRows(),
                                  block_sizes: BlockSizes | None = None,
                                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention over a right-padded prompt plus column sums of its probabilities.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H]; lengths: [B] valid lengths.
      scale: logit scale, default 1/sqrt(H).
      sliding_window: keys more than `sliding_window - 1` positions back are masked.
      score_rows: AllRows() | LastRows(W) | ProxyRows(rows [B, P]) (entries < 0 or
        >= length are ignored) | None (attention only: colsums is None, no second pass).
      block_sizes: BlockSizes (query / key / selected-row blocks).
      interpret: None = interpret unless the default backend is TPU; True/False force it.

    Returns:
      out [B, T, N, H] in q's dtype and colsums [B, N, T] f32 (sum over selected valid rows r
      of softmax_r at each key; None when score_rows is None).
    """
    scale = check_prefill_args(q, k, v, lengths, scale)
    return _prefill(q, k, v, lengths, check_score_rows(score_rows), scale=scale,
                    sliding_window=sliding_window, block_sizes=block_sizes or BlockSizes(),
                    interpret=interpret)
