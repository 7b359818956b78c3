"""Decode attention over a compressed KV cache: Mosaic TPU kernel.

One query token per sequence attends over a compressed prefix (per-kv-head ragged lengths,
optional thin keys and values) and a dense tail, with one softmax. The grid is (B, K, prefix blocks +
tail blocks): each program holds the G query heads of one kv head, so every cached slot is read
from HBM once for the whole group. Blocks past a head's valid length are skipped, and their
index map repeats the last needed block so that no DMA is issued for them: the bytes read are
those of the valid slots (rounded up to a block). Softmax statistics and two accumulators
(prefix values, possibly thin, and tail values) live in VMEM scratch in f32; the prefix part is
scattered onto its kept value channels outside the kernel.

Segments of the store: the prefix arrays are the cache's whole store (R rows, R dividing K;
`kvjax.cache.KVStore`) and each kv head reads its layer's segment [offset, offset + length) of
its row in place (`prefix_offset`). The index maps walk the row's own blocks from
the one holding `offset` (scalar prefetch), and the kernel masks the slots outside the
segment; an unaligned segment costs at most one extra block of reads.

Spec: `kvjax.attention.cached_attention_reference` with T = 1.
Axis letters: B batch, N q heads, K kv heads, G = N // K, H head dim, Hv value dim,
C prefix slots, Dk kept key channels, S tail slots.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _interpret
from pallas_kernels._decode_common import (check_decode_args, check_prefix_scales,
                                           check_prefix_window, gather_thin_queries,
                                           merge_prefix_tail)

_NEG = -1e30  # finite "minus infinity": fully masked blocks never produce inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Slots per grid step for the prefix and the tail.

    A block smaller than the array is used as is (it must then be a multiple of 128: it is the
    lane dimension of the position block); an array smaller than its block is one full block.
    """

    block_prefix: int = 512
    block_tail: int = 256

    def __post_init__(self):
        for name in ("block_prefix", "block_tail"):
            val = getattr(self, name)
            if val < 128 or val % 128:
                raise ValueError(f"{name}={val} must be a positive multiple of 128")


def _online_update(s, valid, v, m_ref, l_ref, acc_ref, other_acc_ref, v_scale=None):
    """One flash-softmax step into acc_ref; other_acc_ref (the other source's) is rescaled.

    s, valid: [G, bs]; v: [bs, D] (rows past the data zeroed); v_scale: [1, bs] per-slot
    value scales of a quantized store (they weight the probabilities in P V), or None.
    """
    s = jnp.where(valid, s, _NEG)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    # scales of slots outside the data are garbage (NaN in interpret mode): 0 * NaN = NaN
    pw = p if v_scale is None else p * jnp.where(valid, v_scale, 0.0)
    pv = jax.lax.dot_general(pw, v.astype(jnp.float32), (((1,), (0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
    acc_ref[...] = alpha * acc_ref[...] + pv
    other_acc_ref[...] = alpha * other_acc_ref[...]
    m_ref[...] = m_new


def _scores(q, k, scale):
    """q [G, D], k [bs, D] (a quantized store's int8/fp8 keys too) -> [G, bs] f32 logits."""
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jax.lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32)
    return s * scale


def _kernel(len_ref, off_ref, cnt_ref, qpos_ref,  # scalar prefetch: [B*K], [B*K], [B], [B]
            qp_ref,  # [G, Dk] queries gathered on the kept key channels
            qt_ref,  # [G, H] full-width queries (for the tail)
            pk_ref,  # [bp, Dk] prefix keys
            pv_ref,  # [bp, Hv] prefix values
            ppos_ref,  # [R, bp] prefix positions of all store rows
            *refs,  # quantized: ks_ref, vs_ref [R, bp] f32 scales of all store rows; then:
            # tk_ref, tv_ref [bt, H] tail keys / values; tpos_ref [1, bt] tail positions;
            # op_ref [G, Hv], ot_ref [G, H] f32 prefix / tail parts of the output (normalised);
            # scratch m_ref, l_ref [G, 1], accp_ref [G, Hv], acct_ref [G, H] f32
            scale, n_kv, per_row, n_prefix_blocks, bp, bt, sliding_window, quantized):
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)
    (tk_ref, tv_ref, tpos_ref, op_ref, ot_ref, m_ref, l_ref, accp_ref,
     acct_ref) = refs[2:] if quantized else refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = jax.lax.div(h, per_row)  # the prefix row (of R) holding this head's segments
    length, count, q_pos = len_ref[b * n_kv + h], cnt_ref[b], qpos_ref[b]
    # The prefix is slots [offset, offset + length) of its row; its blocks are the row's own
    # blocks, starting with the one holding `offset`.
    offset = off_ref[b * n_kv + h]
    first = jax.lax.div(offset, bp) * bp  # lax.div: offsets are >= 0, no sign fix-up needed

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        accp_ref[...] = jnp.zeros(accp_ref.shape, jnp.float32)
        acct_ref[...] = jnp.zeros(acct_ref.shape, jnp.float32)

    def scale_row(ref):  # a quantized prefix's per-slot scales of this head's row: [1, bs]
        return None if ref is None else ref[pl.ds(row, 1), :]

    def attend(q_ref, k_ref, v_ref, pos_ref, start, lo, limit, causal, acc_ref,
               other_acc_ref, ks_ref=None, vs_ref=None):
        s = _scores(q_ref[...], k_ref[...], scale)  # [G, bs]
        if ks_ref is not None:
            s = s * scale_row(ks_ref)
        bs = s.shape[1]
        slot = start + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        valid = (slot >= lo) & (slot < limit)
        if causal or sliding_window is not None:
            pos = pos_ref[...] if causal else pos_ref[pl.ds(row, 1), :]
            if causal:
                valid &= pos <= q_pos
            if sliding_window is not None:
                valid &= q_pos - pos < sliding_window
        rows = start + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)
        # rows outside [lo, limit): past the array (garbage) or another head's segment
        v = jnp.where((rows >= lo) & (rows < limit), v_ref[...], 0)
        _online_update(s, valid, v, m_ref, l_ref, acc_ref, other_acc_ref, scale_row(vs_ref))

    @pl.when((j < n_prefix_blocks) & (first + j * bp < offset + length))
    def _prefix():
        attend(qp_ref, pk_ref, pv_ref, ppos_ref, first + j * bp, offset, offset + length, False,
               accp_ref, acct_ref, ks_ref, vs_ref)

    jt = j - n_prefix_blocks

    @pl.when((jt >= 0) & (jt * bt < count))
    def _tail():
        attend(qt_ref, tk_ref, tv_ref, tpos_ref, jt * bt, 0, count, True, acct_ref, accp_ref)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        inv = jnp.where(l > 0, 1.0 / jnp.maximum(l, 1e-30), 0.0)  # no valid slot: zeros
        op_ref[...] = accp_ref[...] * inv
        ot_ref[...] = acct_ref[...] * inv


def _last_block(n_valid, block):
    return jnp.maximum(pl.cdiv(n_valid, block) - 1, 0)


def _prefix_blocks(c, bp, max_len):
    """Grid steps for the prefix: blocks of a `max_len`-slot segment, plus one (a segment
    starting inside a block may straddle one more block), at most the row's."""
    return min(pl.cdiv(max_len + bp - 1, bp), pl.cdiv(c, bp))


def _call(qp, qt, pk, pv, ppos, scales, tk, tv, tpos, lens, offs, counts, q_pos, *, scale,
          sliding_window, bp, bt, max_len, interpret):
    """The prefix arrays are the store (pk [B or 1, R, C, Dk], ppos [B or 1, R, C]) read at
    `offs`; `scales`: () or (k_scale, v_scale) [B or 1, R, C] f32. A batch-1 store with
    B > 1 is shared: every sequence's blocks come from store batch 0."""
    b, n_kv, g, dk = qp.shape
    rows = pk.shape[1]
    shared = pk.shape[0] != b
    per_row = n_kv // rows
    c, hv, s, h = pk.shape[2], pv.shape[3], tk.shape[2], qt.shape[3]
    n_pb, n_tb = _prefix_blocks(c, bp, max_len), pl.cdiv(s, bt)

    def prefix_map(bi, hi, j, len_ref, off_ref, cnt_ref, qpos_ref):
        r = bi * n_kv + hi
        off = off_ref[r]
        last = _last_block(jax.lax.rem(off, bp) + len_ref[r], bp)  # later steps repeat it
        blk = jax.lax.div(off, bp) + jnp.minimum(j, last)
        sbi = 0 if shared else bi  # the store's batch index: 0 for a shared store
        return sbi, jax.lax.div(hi, per_row), jnp.minimum(blk, pl.cdiv(c, bp) - 1), 0

    def tail_map(bi, hi, j, len_ref, off_ref, cnt_ref, qpos_ref):
        return bi, hi, jnp.clip(j - n_pb, 0, _last_block(cnt_ref[bi], bt)), 0

    def store_pos_map(*args):  # store positions [B, R, P]: all R rows (an R-row block is legal)
        sbi, _, blk, _ = prefix_map(*args)
        return sbi, 0, blk if sliding_window is not None else 0  # unread without a window

    def store_scale_map(*args):  # store scales [B, R, P]: all R rows, always read
        sbi, _, blk, _ = prefix_map(*args)
        return sbi, 0, blk

    def tpos_map(*args):  # positions [B, 1, S]
        bi, _, blk, _ = tail_map(*args)
        return bi, 0, blk

    def head_map(bi, hi, j, *_):
        return bi, hi, 0, 0

    kernel = functools.partial(_kernel, scale=scale, n_kv=n_kv, per_row=per_row,
                               n_prefix_blocks=n_pb, bp=bp, bt=bt,
                               sliding_window=sliding_window, quantized=bool(scales))
    pos_spec = pl.BlockSpec((None, rows, bp), store_pos_map)
    scale_spec = pl.BlockSpec((None, rows, bp), store_scale_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, n_kv, n_pb + n_tb),
        in_specs=[pl.BlockSpec((None, None, g, dk), head_map),
                  pl.BlockSpec((None, None, g, h), head_map),
                  pl.BlockSpec((None, None, bp, dk), prefix_map),
                  pl.BlockSpec((None, None, bp, hv), prefix_map),
                  pos_spec,
                  *([scale_spec] * len(scales)),
                  pl.BlockSpec((None, None, bt, h), tail_map),
                  pl.BlockSpec((None, None, bt, h), tail_map),
                  pl.BlockSpec((None, 1, bt), tpos_map)],
        out_specs=[pl.BlockSpec((None, None, g, hv), head_map),
                   pl.BlockSpec((None, None, g, h), head_map)],
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, hv), jnp.float32), pltpu.VMEM((g, h), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, n_kv, g, hv), jnp.float32),
                   jax.ShapeDtypeStruct((b, n_kv, g, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(lens, offs, counts, q_pos, qp, qt, pk, pv, ppos, *scales, tk, tv, tpos)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "max_prefix_len",
                                             "block_sizes", "interpret"))
def decode_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                     prefix_len: jax.Array, prefix_pos: jax.Array, tail_k: jax.Array,
                     tail_v: jax.Array, tail_pos: jax.Array, tail_count: jax.Array,
                     q_pos: jax.Array, *, prefix_offset: jax.Array,
                     max_prefix_len: int | None = None, channels: jax.Array | None = None,
                     value_channels: jax.Array | None = None, scale: float | None = None,
                     sliding_window: int | None = None,
                     prefix_k_scale: jax.Array | None = None,
                     prefix_v_scale: jax.Array | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Attend one new query token per sequence over a compressed prefix plus a dense tail.

    The prefix arrays are the cache's store (`kvjax.cache.KVStore`: R rows of C slots, R
    dividing K) and head (b, h) reads its segment [offset, offset + prefix_len) of row
    h // (K // R) in place: the index maps start at the block holding `offset` (one extra
    block at most), so no segment is copied.

    A shared store (batch 1 in prefix_k, prefix_v, prefix_pos and the scales, while q, the
    table and the tail have batch B: `kvjax.context.share`, the engine's pool in
    kvjax/engine/pool.py) is read by every sequence at its own offsets: the store's index
    maps use batch 0 for every query, nothing is broadcast to B.

    Args:
      q: [B, N, H] post-RoPE queries (bf16 or f32).
      prefix_k: [B, R, C, Dk] store keys (Dk < H with thin keys), or [1, R, C, Dk] shared;
        prefix_v: [B or 1, R, C, Hv]; R = K (one row per kv head) or any divisor of K.
      prefix_len: [B, K] valid prefix slots per kv head (0 allowed).
      prefix_pos: [B or 1, R, C] original positions (used by the sliding window).
      tail_k, tail_v: [B, K, S, H] dense tail; tail_pos: [B, S]; tail_count: [B] valid slots.
      q_pos: [B] position of the query (tail slots after it are masked).
      prefix_offset: [B, K] int32 first slot of each head's segment in its row.
      max_prefix_len: static bound on prefix_len (grid size), default C.
      channels: [B, K, Dk] kept key channels of the prefix, or None for full-width keys.
      value_channels: [B, K, Hv] kept value channels of the prefix (the prefix contributes to
        those output channels only), or None for full-width values (Hv = H).
      scale: logit scale, default 1/sqrt(H) (full H even with thin keys).
      sliding_window: Mistral-style window on positions, or None.
      prefix_k_scale, prefix_v_scale: [B or 1, R, C] f32 per-slot scales of a quantized prefix
        (`kvjax.quant`, scheme "token": prefix_k/v in int8 or float8_e4m3fn), or None. The
        kernel reads the quantized blocks and applies the scales to the logits and to the
        probabilities of P V.
      block_sizes: slots per grid step (BlockSizes).
      interpret: None = interpret unless the default backend is TPU; True/False force it.

    Returns:
      [B, N, H] in q's dtype; heads with no valid slot give zeros.
    """
    bs = block_sizes or BlockSizes()
    b, n, h = q.shape
    scale, qg = check_decode_args(q, prefix_k, prefix_v, prefix_len, prefix_pos, tail_k,
                                  tail_v, tail_pos, tail_count, q_pos, channels, scale,
                                  value_channels)
    qp = gather_thin_queries(qg, channels)
    c, s = prefix_k.shape[2], tail_k.shape[2]
    offsets, max_len = check_prefix_window(prefix_offset, max_prefix_len, prefix_len, c)
    scales = check_prefix_scales(prefix_k, prefix_v, prefix_k_scale, prefix_v_scale)
    bp, bt = min(c, bs.block_prefix), min(s, bs.block_tail)

    def i32(x):
        return x.astype(jnp.int32)

    # positions and scales are read as they are stored, [B, R, P] (no copy of the store)
    scales = tuple(x.astype(jnp.float32) for x in scales)
    o_prefix, o_tail = _call(
        qp, qg, prefix_k, prefix_v, i32(prefix_pos), scales, tail_k, tail_v,
        i32(tail_pos)[:, None, :], i32(prefix_len).reshape(-1), offsets, i32(tail_count),
        i32(q_pos), scale=scale,
        sliding_window=sliding_window, bp=bp, bt=bt, max_len=max_len,
        interpret=_interpret.tpu_interpret(interpret))
    return merge_prefix_tail(o_prefix, o_tail, value_channels).reshape(b, n, h).astype(q.dtype)
