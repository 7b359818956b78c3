"""The compiled (non-interpret) kernels lower for their real backends, checked on CPU.

`jax.export(..., platforms=(...))` runs the Pallas -> Mosaic TPU and Pallas -> Mosaic GPU
lowering without the hardware: block-shape rules, Mosaic GPU register layouts, TMA tiling,
WGMMA operand shapes and the shared-memory budget (sm90: 227 KiB) are all checked here. What
this cannot check: Mosaic's own compilation inside libtpu, ptxas, and execution; those need the
accelerator (the non-interpret test classes).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import gpu, tpu

I32 = jnp.int32
BF16 = jnp.bfloat16


def _decode_specs(b, n, n_kv, h, c, s, dk, hv, dtype):
    sd = jax.ShapeDtypeStruct
    args = (sd((b, n, h), dtype), sd((b, n_kv, c, dk), dtype), sd((b, n_kv, c, hv), dtype),
            sd((b, n_kv), I32), sd((b, n_kv, c), I32), sd((b, n_kv, s, h), dtype),
            sd((b, n_kv, s, h), dtype), sd((b, s), I32), sd((b,), I32), sd((b,), I32))
    ch = sd((b, n_kv, dk), I32) if dk != h else None
    vch = sd((b, n_kv, hv), I32) if hv != h else None
    return args, ch, vch


# (id, B, N, K, H, C, S, Dk, Hv, dtype, window): a Llama-3-8B layer at 32k slots, a GQA-3
# odd-capacity thin-key case in f32 with a window, and thin keys + values at H=128 (the
# largest shared-memory footprint of the GPU kernel).
DECODE = [
    ("llama3_8b_32k", 1, 32, 8, 128, 32768, 256, 128, 128, BF16, None),
    ("gqa3_odd_thinK_f32_window", 2, 6, 2, 64, 37, 5, 32, 64, jnp.float32, 4096),
    ("thinKV_h128", 2, 24, 3, 128, 1001, 300, 112, 96, BF16, None),
]


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
@pytest.mark.parametrize("case", DECODE, ids=[c[0] for c in DECODE])
def test_decode_lowers(platform, module, case):
    _, b, n, n_kv, h, c, s, dk, hv, dtype, window = case
    args, ch, vch = _decode_specs(b, n, n_kv, h, c, s, dk, hv, dtype)

    def f(*a, ch=None, vch=None):
        return module.decode_attention(*a, channels=ch, value_channels=vch,
                                       sliding_window=window, interpret=False)
    exported = export.export(jax.jit(f), platforms=(platform,))(*args, ch=ch, vch=vch)
    assert exported.out_avals[0].shape == (b, n, h)


# (id, B, T, N, K, H, dtype, window, score_rows)
PREFILL = [
    ("llama3_8b_8k_all", 1, 8192, 32, 8, 128, BF16, None, "all"),
    ("mistral_window_snapkv", 2, 1000, 24, 3, 64, jnp.float32, 256, ("window", 32)),
]


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
@pytest.mark.parametrize("case", PREFILL, ids=[c[0] for c in PREFILL])
def test_prefill_lowers(platform, module, case):
    _, b, t, n, n_kv, h, dtype, window, rows = case
    sd = jax.ShapeDtypeStruct

    def f(q, k, v, lengths):
        return module.prefill_attention_with_scores(q, k, v, lengths, sliding_window=window,
                                                    score_rows=rows, interpret=False)
    exported = export.export(jax.jit(f), platforms=(platform,))(
        sd((b, t, n, h), dtype), sd((b, t, n_kv, h), dtype), sd((b, t, n_kv, h), dtype),
        sd((b,), I32))
    assert [a.shape for a in exported.out_avals] == [(b, t, n, h), (b, n, t)]


def test_gpu_lowering_rejects_too_much_shared_memory():
    """block_kv=128 at H=128 needs more than sm90's 227 KiB of SMEM: lowering says so."""
    args, _, _ = _decode_specs(1, 32, 8, 128, 8192, 256, 128, 128, BF16)

    def f(*a):
        return gpu.decode_attention(*a, block_sizes=gpu.DecodeBlockSizes(block_kv=128),
                                    interpret=False)

    with pytest.raises(Exception, match="shared memory"):
        export.export(jax.jit(f), platforms=("cuda",))(*args)
