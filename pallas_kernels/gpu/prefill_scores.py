"""Causal prefill attention that also emits attention column sums: Mosaic GPU kernels (sm90).

Pass 1 (`_fwd_kernel`): flash attention, one warpgroup per (batch, q head, 64-row query tile),
looping over only the key blocks that causality, the sliding window and the valid length leave
(double-buffered TMA, S = Q K^T and P V on WGMMA, online softmax in f32), writing the output
and each row's log-sum-exp. Pass 2 (`_colsum_kernel`): one warpgroup per (batch, q head,
64-key block) keeps the key tile in SMEM, streams the selected query rows in 64-row tiles
(only the row blocks that can see this key block), computes the transposed logits K Q_rows^T
and sums exp(logit - lse) over rows. The T x T matrix is never materialised.

Inputs are computed in bf16/f16 (WGMMA): f32 inputs are rounded to bf16 first (f32
accumulation and softmax). T is padded to a multiple of 64 (a no-op for kvjax's length buckets).

Spec: `kvjax.attention_scores.prefill_attention_with_scores_reference`.
Axis letters: B batch, T prompt, N q heads, K kv heads, G = N // K, H head dim, P rows.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _interpret
from pallas_kernels._prefill_common import (AllRows, ScoreRows, check_prefill_args,
                                            check_score_rows, key_block_range, pad_axis,
                                            round_up, row_block_tables, score_row_positions)
from pallas_kernels.gpu import _mgpu

_NEG = -1e30
_BQ = _mgpu.ROWS  # query rows per warpgroup tile (WGMMA M)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Key block of the forward pass (query, row and colsum key tiles are 64: WGMMA M)."""

    block_kv: int = 64

    def __post_init__(self):
        if self.block_kv < 64 or self.block_kv % 64:
            raise ValueError(f"{self.block_kv=} must be a positive multiple of 64")


def _fwd_kernel(len_ref,  # GMEM [B] int32
                q_ref,  # [B, Tp, N, H]
                k_ref, v_ref,  # [B, Tp, K, H]
                o_ref,  # [B, Tp, N, H]
                lse_ref,  # [B, N, Tp] f32
                qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar,
                *, g, scale, bk, sliding_window, interpret):
    b, n, i = (jax.lax.axis_index(a) for a in ("b", "n", "q"))
    h = jax.lax.div(n, g)
    length = len_ref[b]
    first, last = key_block_range(i, _BQ, bk, length, sliding_window)
    n_blocks = last - first + 1
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(i * _BQ, _BQ), n], qo_smem, q_bar.at[0])

    def fetch(j, slot):
        sl = (b, pl.ds((first + j) * bk, bk), h)
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

    fetch(0, 0)  # n_blocks >= 1: every query tile sees key block `last` >= first
    plgpu.barrier_wait(q_bar.at[0])

    def body(j, carry):
        m, l, acc = carry
        slot = jax.lax.rem(j, 2)

        @pl.when(j + 1 < n_blocks)
        def _():
            fetch(j + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])
        s = _mgpu.mma_nt(qo_smem, k_smem.at[slot], interpret) * scale  # [64, bk]
        q_pos = i * _BQ + _mgpu.iota(s.shape, 0, interpret)
        k_pos = (first + j) * bk + _mgpu.iota(s.shape, 1, interpret)
        valid = (k_pos <= q_pos) & (k_pos < length)
        if sliding_window is not None:
            valid &= q_pos - k_pos < sliding_window
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - _mgpu.row_bcast(m_new, s.shape)), 0.0)
        l = l * alpha + p.sum(axis=1)
        plgpu.barrier_wait(v_bar.at[slot])
        pv = _mgpu.mma_nn(p.astype(v_smem.dtype), v_smem.at[slot], interpret)
        return m_new, l, acc * _mgpu.row_bcast(alpha, acc.shape) + pv

    hd = qo_smem.shape[1]
    carry = (_mgpu.full((_BQ,), _NEG, _mgpu.ROW, interpret),
             _mgpu.full((_BQ,), 0.0, _mgpu.ROW, interpret),
             _mgpu.full((_BQ, hd), 0.0, _mgpu.TILE, interpret))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, carry)
    l_safe = jnp.where(l > 0, l, 1.0)
    inv = jnp.where(l > 0, 1.0 / l_safe, 0.0)  # rows with no valid key give zeros
    qo_smem[...] = (acc * _mgpu.row_bcast(inv, acc.shape)).astype(qo_smem.dtype)
    lse_smem[...] = jnp.where(l > 0, m + jnp.log(l_safe), jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(i * _BQ, _BQ), n])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, n, pl.ds(i * _BQ, _BQ)])
    plgpu.wait_smem_to_gmem(0)


def _colsum_kernel(len_ref,  # GMEM [B] int32
                   first_ref, last_ref,  # GMEM [B, nk] int32: row blocks to visit
                   qr_ref,  # [B, Pp, N, H] selected query rows
                   k_ref,  # [B, Tp, K, H]
                   lse_ref,  # [B, N, Pp] f32 (+inf on rows that do not count)
                   rpos_ref,  # [B, Pp] int32 row positions
                   o_ref,  # [B, N, Tp] f32 column sums
                   k_smem, q_smem, lse_smem, rpos_smem, o_smem, k_bar, q_bar, lse_bar, pos_bar,
                   *, g, scale, sliding_window, interpret):
    b, n, j = (jax.lax.axis_index(a) for a in ("b", "n", "k"))
    length, first, last = len_ref[b], first_ref[b, j], last_ref[b, j]
    n_blocks = jnp.maximum(last - first + 1, 0)
    plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(j * _BQ, _BQ), jax.lax.div(n, g)], k_smem,
                            k_bar.at[0])

    def fetch(r, slot):
        rows = pl.ds((first + r) * _BQ, _BQ)
        plgpu.copy_gmem_to_smem(qr_ref.at[b, rows, n], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], lse_smem.at[slot], lse_bar.at[slot])
        plgpu.copy_gmem_to_smem(rpos_ref.at[b, rows], rpos_smem.at[slot], pos_bar.at[slot])

    @pl.when(n_blocks > 0)
    def _():
        fetch(0, 0)

    plgpu.barrier_wait(k_bar.at[0])

    def body(r, acc):
        slot = jax.lax.rem(r, 2)

        @pl.when(r + 1 < n_blocks)
        def _():
            fetch(r + 1, 1 - slot)

        plgpu.barrier_wait(q_bar.at[slot])
        s = _mgpu.mma_nt(k_smem, q_smem.at[slot], interpret) * scale  # [64 keys, 64 rows]
        plgpu.barrier_wait(lse_bar.at[slot])
        plgpu.barrier_wait(pos_bar.at[slot])
        lse = _mgpu.col_bcast(_mgpu.load_vec(lse_smem.at[slot], _mgpu.COL, interpret), s.shape)
        r_pos = _mgpu.col_bcast(_mgpu.load_vec(rpos_smem.at[slot], _mgpu.COL, interpret),
                                s.shape)
        k_pos = j * _BQ + _mgpu.iota(s.shape, 0, interpret)
        valid = (k_pos <= r_pos) & (k_pos < length)
        if sliding_window is not None:
            valid &= r_pos - k_pos < sliding_window
        p = jnp.where(valid, jnp.exp(jnp.where(valid, s, _NEG) - lse), 0.0)
        return acc + p.sum(axis=1)

    acc = jax.lax.fori_loop(0, n_blocks, body, _mgpu.full((_BQ,), 0.0, _mgpu.ROW, interpret))
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, n, pl.ds(j * _BQ, _BQ)])
    plgpu.wait_smem_to_gmem(0)


def _fwd(q, k, v, lengths, *, scale, bk, sliding_window, interpret):
    b, tp, n, h = q.shape
    tr, dt = _mgpu.smem_transforms(h, q.dtype), q.dtype
    scratch = [plgpu.SMEM((_BQ, h), dt, transforms=tr),
               plgpu.SMEM((2, bk, h), dt, transforms=tr),
               plgpu.SMEM((2, bk, h), dt, transforms=tr),
               plgpu.SMEM((_BQ,), jnp.float32),
               plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2),
               plgpu.Barrier(num_barriers=2)]
    kernel = functools.partial(_fwd_kernel, g=n // k.shape[2], scale=scale, bk=bk,
                               sliding_window=sliding_window, interpret=interpret is not None)
    return plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct(q.shape, dt),
                          jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
        scratch_types=scratch, grid=(b, n, tp // _BQ), grid_names=("b", "n", "q"),
        interpret=interpret)(lengths, q, k, v)


def _colsums(q_rows, k, lse_rows, row_pos, first, last, lengths, *, scale, sliding_window,
             interpret):
    b, _, n, h = q_rows.shape
    tp = k.shape[1]
    tr, dt = _mgpu.smem_transforms(h, q_rows.dtype), q_rows.dtype
    scratch = [plgpu.SMEM((_BQ, h), dt, transforms=tr),
               plgpu.SMEM((2, _BQ, h), dt, transforms=tr),
               plgpu.SMEM((2, _BQ), jnp.float32), plgpu.SMEM((2, _BQ), jnp.int32),
               plgpu.SMEM((_BQ,), jnp.float32),
               plgpu.Barrier(num_barriers=1),
               *(plgpu.Barrier(num_barriers=2) for _ in range(3))]
    kernel = functools.partial(_colsum_kernel, g=n // k.shape[2], scale=scale,
                               sliding_window=sliding_window, interpret=interpret is not None)
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((b, n, tp), jnp.float32), scratch_types=scratch,
        grid=(b, n, tp // _BQ), grid_names=("b", "n", "k"),
        interpret=interpret)(lengths, first, last, q_rows, k, lse_rows, row_pos)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "block_sizes",
                                             "interpret"))
def _prefill(q, k, v, lengths, score_rows, *, scale, sliding_window, block_sizes, interpret):
    t, h = q.shape[1], q.shape[3]
    bk = block_sizes.block_kv
    if h % 16:
        raise ValueError(f"head dim {h=} must be a multiple of 16")
    dt = jnp.bfloat16 if q.dtype == jnp.float32 else q.dtype
    tp = round_up(t, bk)
    qp, kp, vp = (pad_axis(x, 1, tp).astype(dt) for x in (q, k, v))
    lengths = lengths.astype(jnp.int32)
    interpret = _interpret.gpu_interpret(interpret)
    o, lse = _fwd(qp, kp, vp, lengths, scale=scale, bk=bk, sliding_window=sliding_window,
                  interpret=interpret)
    if score_rows is None:
        return o[:, :t].astype(q.dtype), None
    rows, valid = score_row_positions(score_rows, lengths, t)
    pr = round_up(rows.shape[1], _BQ)
    rows, valid = pad_axis(rows, 1, pr), pad_axis(valid, 1, pr, False)
    all_rows = isinstance(score_rows, AllRows)
    q_rows = qp if all_rows else jnp.take_along_axis(qp, rows[:, :, None, None], 1)
    lse_rows = jnp.where(valid[:, None, :], jnp.take_along_axis(lse, rows[:, None, :], 2),
                         jnp.inf)
    _, _, first, last = row_block_tables(rows, valid, _BQ, tp // _BQ, _BQ, sliding_window)
    cols = _colsums(q_rows, kp, lse_rows, rows, first, last, lengths, scale=scale,
                    sliding_window=sliding_window, interpret=interpret)
    return o[:, :t].astype(q.dtype), cols[:, :, :t]


def prefill_attention_with_scores(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                                  *, scale: float | None = None,
                                  sliding_window: int | None = None,
                                  score_rows: ScoreRows | None = AllRows(),
                                  block_sizes: BlockSizes | None = None,
                                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention over a right-padded prompt plus column sums of its probabilities.

    Args:
      q: [B, T, N, H] post-RoPE queries (bf16/f16; f32 is rounded to bf16 for the MMAs);
        k, v: [B, T, K, H]; lengths: [B] valid lengths.
      scale: logit scale, default 1/sqrt(H).
      sliding_window: keys more than `sliding_window - 1` positions back are masked.
      score_rows: AllRows() | LastRows(W) | ProxyRows(rows [B, P]) (entries < 0 or
        >= length are ignored) | None (attention only: colsums is None, no second pass).
      block_sizes: BlockSizes (key block of the forward pass).
      interpret: None = Mosaic GPU interpreter unless the default backend is GPU.

    Returns:
      out [B, T, N, H] in q's dtype and colsums [B, N, T] f32 (or None).
    """
    scale = check_prefill_args(q, k, v, lengths, scale)
    return _prefill(q, k, v, lengths, check_score_rows(score_rows), scale=scale,
                    sliding_window=sliding_window, block_sizes=block_sizes or BlockSizes(),
                    interpret=interpret)
