"""Mosaic GPU building blocks shared by the GPU kernels, with their interpret-mode forms.

The Mosaic GPU interpreter of jax 0.10.2 (``InterpretGPUParams``) runs grids, TMA copies,
barriers and SMEM faithfully, but lacks three things these kernels use: a CPU rule for
``layout_cast`` (a register-layout hint, semantically the identity), ``plgpu.load`` (a load with
a layout), and WGMMA with a register operand or a transposed SMEM operand. Under interpret mode
these helpers therefore drop the layout hints and compute the two MMAs as f32-accumulating
``dot_general`` of the same SMEM tiles. Everything else in a kernel body is the same code in both
modes. This file is the only place where the two modes differ.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # WGMMA M: query rows of one warpgroup tile (GQA heads are padded up to it)


def smem_transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle for an MMA operand tile whose minor dimension has `minor` elements."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits, "kernel tile")
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def cast(x, layout, interpret: bool):
    """plgpu.layout_cast, or the identity in interpret mode."""
    return x if interpret else plgpu.layout_cast(x, layout)


def full(shape, value, layout, interpret: bool):
    """An f32 constant array with a register layout."""
    return cast(jnp.full(shape, value, jnp.float32), layout, interpret)


def iota(shape, dim, interpret: bool):
    """int32 iota along `dim` in the WGMMA register layout."""
    if interpret:
        return jax.lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def load_vec(ref, layout, interpret: bool):
    """Load a 1-D ref (SMEM or GMEM slice) into registers with `layout`."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def mma_nt(a_smem, b_smem, interpret: bool):
    """a [M, D] @ b [N, D]^T -> [M, N] f32, both operands in SMEM (WGMMA, B transposed)."""
    if interpret:
        return jax.lax.dot_general(a_smem[...], b_smem[...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def mma_nn(a_regs, b_smem, interpret: bool):
    """a [M, K] (16-bit registers) @ b [K, N] (SMEM) -> [M, N] f32 (WGMMA, register LHS)."""
    if interpret:
        return jax.lax.dot_general(a_regs, b_smem[...], (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_regs, b_smem)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC((a_regs.shape[0], b_smem.shape[1]), jnp.float32))


def row_bcast(x, shape):
    """[M] row statistics (WGMMA.reduce(1)) -> [M, N]."""
    return jax.lax.broadcast_in_dim(x, shape, [0])


def col_bcast(x, shape):
    """[N] per-column values (WGMMA.reduce(0)) -> [M, N]."""
    return jax.lax.broadcast_in_dim(x, shape, [1])


ROW = plgpu.Layout.WGMMA.reduce(1)  # layout of per-row statistics (m, l)
COL = plgpu.Layout.WGMMA.reduce(0)  # layout of per-column vectors (key positions)
TILE = plgpu.Layout.WGMMA
