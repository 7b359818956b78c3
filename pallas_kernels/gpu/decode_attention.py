"""Decode attention over a compressed KV cache: Mosaic GPU kernel (Hopper, sm90).

Flash-decoding: the grid is (B*K kv heads, splits). A CTA is one warpgroup that holds the G
query heads of its kv head as the rows of one 64-row WGMMA tile, so each cached slot is read
from HBM once for the whole group, and walks its share of the prefix blocks, then of the tail
blocks: TMA copies of K and V tiles into double-buffered, swizzled SMEM (the next block's copy
is in flight while the current one is multiplied), S = Q K^T and P V on the tensor cores, and
an online softmax in f32 registers. Blocks past a head's valid length are never copied. Each
split writes unnormalised partials (acc, m, l) for its prefix part and its tail part (their value
widths differ with thin values); a small jnp step combines all partials into one softmax and
scatters the prefix part onto its kept value channels.

Segments of the store: the prefix arrays are the cache's whole store (R rows, R dividing K;
`kvjax.cache.KVStore`) and each kv head walks its layer's segment [offset, offset + length) of
its row in place (`prefix_offset`), its TMA copies starting at the offset rounded down to 8 (a
tile row); the slots before `offset` are masked.

Inputs are computed in bf16/f16 (WGMMA): f32 inputs are rounded to bf16 first, so an f32 call
has bf16 input precision (f32 accumulation and softmax).

Spec: `kvjax.attention.cached_attention_reference` with T = 1.
Axis letters: B batch, N q heads, K kv heads, G = N // K, H head dim, Hv value dim,
C prefix slots, Dk kept key channels, S tail slots.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _interpret
from pallas_kernels._decode_common import (QUANTIZED_DTYPES, check_decode_args,
                                           check_prefix_window, gather_thin_queries,
                                           merge_prefix_tail)
from pallas_kernels.gpu import _mgpu

_NEG = -1e30  # finite "minus infinity": fully masked blocks never produce inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Slots per TMA block and number of splits of the slot axis across CTAs.

    `num_splits=None` picks one split per 512 prefix slots, capped at 32.
    """

    block_kv: int = 64
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_kv < 64 or self.block_kv % 64:
            raise ValueError(f"{self.block_kv=} must be a positive multiple of 64")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1")


def _phase(carry, q_smem, k_ref, v_ref, pos_ref, k_smem, v_smem, pos_smem, bars, *, kv_row,
           pos_row, lo, limit, base, first_block, n_blocks, q_pos, scale, bs, causal,
           sliding_window, interpret):
    """Attend over `n_blocks` blocks of one source (prefix or tail) with double-buffered TMA.

    k_ref, v_ref: [R, X, D] in GMEM, this kv head's slab at `kv_row`; pos_ref: [P, X] in GMEM,
    row `pos_row`; k_smem, v_smem, pos_smem: two buffers each; bars: (k, v, pos) barriers;
    the valid slots are [lo, limit); block i starts at slot base + (first_block + i) * bs
    (base <= lo, a multiple of 8: tiled TMA copies start on a tile row).
    Returns the updated (m [64], l [64], acc [64, Hv]).
    """
    k_bar, v_bar, pos_bar = bars
    use_pos = causal or sliding_window is not None
    n_slots = k_ref.shape[1]

    def start(i):  # clamp the last block inside the array; the mask drops the overlap
        return jnp.minimum(base + (first_block + i) * bs, n_slots - bs)

    def fetch(i, slot):
        sl = (kv_row, pl.ds(start(i), bs))
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])
        if use_pos:
            plgpu.copy_gmem_to_smem(pos_ref.at[pos_row, pl.ds(start(i), bs)], pos_smem.at[slot],
                                    pos_bar.at[slot])

    @pl.when(n_blocks > 0)
    def _():
        fetch(0, 0)

    def body(i, carry):
        m, l, acc = carry
        slot = jax.lax.rem(i, 2)

        @pl.when(i + 1 < n_blocks)
        def _():
            fetch(i + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])
        s = _mgpu.mma_nt(q_smem, k_smem.at[slot], interpret) * scale  # [64, bs]
        st, nominal = start(i), base + (first_block + i) * bs
        idx = st + _mgpu.iota(s.shape, 1, interpret)
        valid = (idx >= jnp.maximum(nominal, lo)) & (idx < limit)
        if use_pos:
            plgpu.barrier_wait(pos_bar.at[slot])
            pos = _mgpu.col_bcast(_mgpu.load_vec(pos_smem.at[slot], _mgpu.COL, interpret),
                                  s.shape)
            if causal:
                valid &= pos <= q_pos
            if sliding_window is not None:
                valid &= q_pos - pos < sliding_window
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - _mgpu.row_bcast(m_new, s.shape)), 0.0)
        l = l * alpha + p.sum(axis=1)
        plgpu.barrier_wait(v_bar.at[slot])
        pv = _mgpu.mma_nn(p.astype(v_smem.dtype), v_smem.at[slot], interpret)
        return m_new, l, acc * _mgpu.row_bcast(alpha, acc.shape) + pv

    return jax.lax.fori_loop(0, n_blocks, body, carry)


def _init_carry(rows, width, interpret):
    return (_mgpu.full((rows,), _NEG, _mgpu.ROW, interpret),
            _mgpu.full((rows,), 0.0, _mgpu.ROW, interpret),
            _mgpu.full((rows, width), 0.0, _mgpu.TILE, interpret))


def _kernel(len_ref, off_ref, cnt_ref, qpos_ref,  # GMEM int32: [B*K], [B*K], [B], [B]
            qp_ref,  # [B*K, 64, Dk] queries on the kept key channels (rows >= G are zero)
            qt_ref,  # [B*K, 64, H] full-width queries
            pk_ref, pv_ref,  # [B*R, C, Dk], [B*R, C, Hv] prefix rows (the whole store);
            # a shared store: [R, C, Dk], [R, C, Hv], read by every sequence
            ppos_ref,  # [B*R, C] prefix positions ([R, C] shared)
            tk_ref, tv_ref,  # [B*K, S, H] tail
            tpos_ref,  # [B, S] tail positions
            op_ref,  # [B*K, splits, 64, Hv] f32 unnormalised prefix partials
            ot_ref,  # [B*K, splits, 64, H] f32 unnormalised tail partials
            m_ref, l_ref,  # [B*K, splits, 2, 64] f32 partial max / sum (prefix, tail)
            qp_smem, qt_smem, kv_smem, pos_smem, op_smem, ot_smem, m_smem, l_smem, q_bar,
            prefix_bars, tail_bars,
            *, n_kv, n_rows, shared, scale, bs, prefix_chunk, tail_chunk, sliding_window,
            interpret):
    row, split = jax.lax.axis_index("bk"), jax.lax.axis_index("split")
    b = jax.lax.div(row, n_kv)
    # the prefix row (of R per store sequence: batch 0 of a shared store) that holds kv head
    # `row - b * K`'s segments
    prow = jax.lax.div(row - b * n_kv, n_kv // n_rows) + (0 if shared else b * n_rows)
    length, count, q_pos = len_ref[row], cnt_ref[b], qpos_ref[b]
    offset = off_ref[row]  # the prefix is slots [offset, offset + length) of its row
    base = jax.lax.div(offset, 8) * 8
    plgpu.copy_gmem_to_smem(qp_ref.at[row], qp_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(qt_ref.at[row], qt_smem, q_bar.at[1])
    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])
    rows = qp_smem.shape[0]
    (pk_smem, pv_smem), (tk_smem, tv_smem) = kv_smem[0], kv_smem[-1]  # shared if same shapes
    common = {"q_pos": q_pos, "scale": scale, "bs": bs,
              "sliding_window": sliding_window, "interpret": interpret}
    # The prefix and the tail are two softmax partials (their value widths may differ with
    # thin values); `_combine` merges them with the other splits' partials.
    first = split * prefix_chunk
    m, l, acc = _phase(_init_carry(rows, op_smem.shape[1], interpret), qp_smem, pk_ref, pv_ref,
                       ppos_ref, pk_smem, pv_smem, pos_smem, prefix_bars, kv_row=prow,
                       pos_row=prow,
                       lo=offset, limit=offset + length, base=base, first_block=first,
                       n_blocks=jnp.where(length > 0, jnp.clip(
                           pl.cdiv(offset + length - base, bs) - first, 0, prefix_chunk), 0),
                       causal=False, **common)
    op_smem[...] = acc
    m_smem[0] = m
    l_smem[0] = l
    first = split * tail_chunk
    m, l, acc = _phase(_init_carry(rows, ot_smem.shape[1], interpret), qt_smem, tk_ref, tv_ref,
                       tpos_ref, tk_smem, tv_smem, pos_smem, tail_bars, kv_row=row, pos_row=b,
                       lo=0,
                       limit=count, base=0, first_block=first,
                       n_blocks=jnp.clip(pl.cdiv(count, bs) - first, 0, tail_chunk),
                       causal=True, **common)
    ot_smem[...] = acc
    m_smem[1] = m
    l_smem[1] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(op_smem, op_ref.at[row, split])
    plgpu.copy_smem_to_gmem(ot_smem, ot_ref.at[row, split])
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[row, split])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[row, split])
    plgpu.wait_smem_to_gmem(0)


def _call(qp, qt, pk, pv, ppos, tk, tv, tpos, lens, offs, counts, q_pos, *, n_kv, n_rows,
          shared, scale, bs, splits, prefix_span, sliding_window, interpret):
    bk_rows, rows, dk = qp.shape
    h, hv, dt = qt.shape[2], pv.shape[2], pk.dtype
    prefix_chunk = pl.cdiv(pl.cdiv(prefix_span, bs), splits)
    tail_chunk = pl.cdiv(pl.cdiv(tk.shape[1], bs), splits)
    tr = _mgpu.smem_transforms
    kv_smem = ((plgpu.SMEM((2, bs, dk), dt, transforms=tr(dk, dt)),
                plgpu.SMEM((2, bs, hv), dt, transforms=tr(hv, dt))),)
    if (dk, hv) != (h, h):  # thin keys or values: the tail needs its own (wider) buffers
        kv_smem += ((plgpu.SMEM((2, bs, h), dt, transforms=tr(h, dt)),
                     plgpu.SMEM((2, bs, h), dt, transforms=tr(h, dt))),)
    scratch = [
        plgpu.SMEM((rows, dk), dt, transforms=tr(dk, dt)),
        plgpu.SMEM((rows, h), dt, transforms=tr(h, dt)),
        kv_smem,
        plgpu.SMEM((2, bs), jnp.int32),
        plgpu.SMEM((rows, hv), jnp.float32),
        plgpu.SMEM((rows, h), jnp.float32),
        plgpu.SMEM((2, rows), jnp.float32),
        plgpu.SMEM((2, rows), jnp.float32),
        plgpu.Barrier(num_barriers=2),
        *(tuple(plgpu.Barrier(num_barriers=2) for _ in range(3)) for _ in range(2)),
    ]
    kernel = functools.partial(_kernel, n_kv=n_kv, n_rows=n_rows, shared=shared, scale=scale,
                               bs=bs, prefix_chunk=prefix_chunk, tail_chunk=tail_chunk,
                               sliding_window=sliding_window, interpret=interpret is not None)
    f32 = jnp.float32
    out_type = (jax.ShapeDtypeStruct((bk_rows, splits, rows, hv), f32),
                jax.ShapeDtypeStruct((bk_rows, splits, rows, h), f32),
                jax.ShapeDtypeStruct((bk_rows, splits, 2, rows), f32),
                jax.ShapeDtypeStruct((bk_rows, splits, 2, rows), f32))
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                        grid=(bk_rows, splits), grid_names=("bk", "split"),
                        interpret=interpret)(lens, offs, counts, q_pos, qp, qt, pk, pv, ppos, tk,
                                             tv, tpos)


def _combine(op, ot, m, l, g):
    """Merge the partials: op [R, splits, 64, Hv], ot [R, splits, 64, H], m, l [R, splits,
    2, 64] -> normalised prefix part [R, G, Hv] and tail part [R, G, H] (one softmax)."""
    m, l = m[..., :g], l[..., :g]
    w = jnp.exp(m - jnp.max(m, axis=(1, 2), keepdims=True)) * (l > 0)  # [R, splits, 2, G]
    denom = jnp.sum(w * l, axis=(1, 2))  # [R, G]
    inv = jnp.where(denom > 0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)[..., None]
    o_prefix = jnp.sum(w[:, :, 0, :, None] * op[:, :, :g], axis=1) * inv
    o_tail = jnp.sum(w[:, :, 1, :, None] * ot[:, :, :g], axis=1) * inv
    return o_prefix, o_tail


def _pad_slots(x, axis, bs):
    """Pad the slot axis to >= one block and to a multiple of 8 (tiled TMA needs it).

    A no-op for capacities that are multiples of 8 and >= block_kv; otherwise a copy (the slow
    path: allocate caches with capacities rounded up to 8 to avoid it).
    """
    n = x.shape[axis]
    target = max(bs, -(-n // 8) * 8)
    if n == target:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target - n)
    return jnp.pad(x, widths)


def _as_rows(x, dt):
    """[B, K, ...] -> [B*K, ...] in the compute dtype."""
    return x.reshape((-1,) + x.shape[2:]).astype(dt)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "max_prefix_len",
                                             "block_sizes", "interpret"))
def decode_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                     prefix_len: jax.Array, prefix_pos: jax.Array, tail_k: jax.Array,
                     tail_v: jax.Array, tail_pos: jax.Array, tail_count: jax.Array,
                     q_pos: jax.Array, *, prefix_offset: jax.Array,
                     max_prefix_len: int | None = None, channels: jax.Array | None = None,
                     value_channels: jax.Array | None = None, scale: float | None = None,
                     sliding_window: int | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Attend one new query token per sequence over a compressed prefix plus a dense tail.

    The prefix arrays are the cache's store (`kvjax.cache.KVStore`: R rows of C slots, R
    dividing K) and head (b, h) reads its segment [offset, offset + prefix_len) of row
    h // (K // R) in place: TMA copies start at the segment's offset rounded down to 8 (tile
    rows), so no segment is copied. Keep C a multiple of 8 and >= block_kv, or the store is
    padded (a copy).

    A shared store (batch 1 in prefix_k, prefix_v and prefix_pos, while q, the table and the
    tail have batch B: `kvjax.context.share`, the engine's pool in kvjax/engine/pool.py) is
    read by every sequence at its own offsets: each CTA's TMA copies come from the store's
    batch-0 rows, nothing is broadcast to B.

    Args:
      q: [B, N, H] post-RoPE queries (bf16/f16; f32 is rounded to bf16 for the MMAs).
      prefix_k: [B, R, C, Dk] store keys (Dk < H with thin keys), or [1, R, C, Dk] shared;
        prefix_v: [B or 1, R, C, Hv]; R = K (one row per kv head) or any divisor of K.
      prefix_len: [B, K] valid prefix slots per kv head (0 allowed).
      prefix_pos: [B or 1, R, C] original positions (used by the sliding window).
      tail_k, tail_v: [B, K, S, H] dense tail; tail_pos: [B, S]; tail_count: [B] valid slots.
      q_pos: [B] position of the query (tail slots after it are masked).
      prefix_offset: [B, K] int32 first slot of each head's segment in its row.
      max_prefix_len: static bound on prefix_len (splits and work per split), default C.
      channels: [B, K, Dk] kept key channels of the prefix, or None for full-width keys.
      value_channels: [B, K, Hv] kept value channels of the prefix (the prefix contributes to
        those output channels only), or None for full-width values (Hv = H).
      scale: logit scale, default 1/sqrt(H) (full H even with thin keys).
      sliding_window: Mistral-style window on positions, or None.
      block_sizes: BlockSizes (slots per TMA block, number of splits).
      interpret: None = Mosaic GPU interpreter unless the default backend is GPU.

    Returns:
      [B, N, H] in q's dtype; heads with no valid slot give zeros.

    Raises:
      ValueError: on shape mismatches, G > 64, or head dims that are not multiples of 16.
    """
    bs = block_sizes or BlockSizes()
    b, n, h = q.shape
    scale, qg = check_decode_args(q, prefix_k, prefix_v, prefix_len, prefix_pos, tail_k,
                                  tail_v, tail_pos, tail_count, q_pos, channels, scale,
                                  value_channels)
    if str(prefix_k.dtype) in QUANTIZED_DTYPES or str(prefix_v.dtype) in QUANTIZED_DTYPES:
        raise ValueError(f"prefix_k.dtype={prefix_k.dtype}: the GPU kernel does not read a "
                         "quantized store yet (kvjax.dispatch sends it to the jnp block walk)")
    n_kv, g = qg.shape[1], qg.shape[2]
    dk, hv = prefix_k.shape[3], prefix_v.shape[3]
    if g > _mgpu.ROWS or any(d % 16 for d in (dk, h, hv)):
        raise ValueError(f"G={g} must be <= {_mgpu.ROWS} and {dk=}, {h=}, {hv=} multiples of 16")
    dt = jnp.bfloat16 if q.dtype == jnp.float32 else q.dtype
    qp = jnp.pad(gather_thin_queries(qg, channels), ((0, 0), (0, 0), (0, _mgpu.ROWS - g), (0, 0)))
    qt = jnp.pad(qg, ((0, 0), (0, 0), (0, _mgpu.ROWS - g), (0, 0)))
    offsets, max_len = check_prefix_window(prefix_offset, max_prefix_len, prefix_len,
                                           prefix_k.shape[2])
    splits = bs.num_splits or max(1, min(32, pl.cdiv(max_len, 512)))
    # a segment at an offset starts up to 7 slots after its 8-aligned first TMA row
    span = min(max_len + 7, prefix_k.shape[2])

    def i32(x):
        return x.astype(jnp.int32)

    op, ot, m, l = _call(
        _as_rows(qp, dt), _as_rows(qt, dt), _as_rows(_pad_slots(prefix_k, 2, bs.block_kv), dt),
        _as_rows(_pad_slots(prefix_v, 2, bs.block_kv), dt),
        _as_rows(_pad_slots(i32(prefix_pos), 2, bs.block_kv), jnp.int32),
        _as_rows(_pad_slots(tail_k, 2, bs.block_kv), dt),
        _as_rows(_pad_slots(tail_v, 2, bs.block_kv), dt),
        _pad_slots(i32(tail_pos), 1, bs.block_kv), i32(prefix_len).reshape(-1), offsets,
        i32(tail_count), i32(q_pos), n_kv=n_kv, n_rows=prefix_k.shape[1],
        shared=prefix_k.shape[0] != b, scale=scale,
        bs=bs.block_kv, splits=splits,
        prefix_span=span, sliding_window=sliding_window,
        interpret=_interpret.gpu_interpret(interpret))
    o_prefix, o_tail = _combine(op, ot, m, l, g)
    o_prefix = o_prefix.reshape(b, n_kv, g, hv)
    o_tail = o_tail.reshape(b, n_kv, g, h)
    return merge_prefix_tail(o_prefix, o_tail, value_channels).reshape(b, n, h).astype(q.dtype)
