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
from flax import nnx
from jax import export

import kvjax
import models
from kvjax import loops
from pallas_kernels import AllRows, LastRows, ProxyRows, gpu, tpu

I32 = jnp.int32
BF16 = jnp.bfloat16


def _decode_specs(b, n, n_kv, h, c, s, dk, hv, dtype, rows=None):
    """Kernel arguments for a store of `rows` (R | K; None: R = K) rows read at offsets."""
    sd = jax.ShapeDtypeStruct
    r = n_kv if rows is None else rows
    args = (sd((b, n, h), dtype), sd((b, r, c, dk), dtype), sd((b, r, c, hv), dtype),
            sd((b, n_kv), I32), sd((b, r, c), I32), sd((b, n_kv, s, h), dtype),
            sd((b, n_kv, s, h), dtype), sd((b, s), I32), sd((b,), I32), sd((b,), I32))
    ch = sd((b, n_kv, dk), I32) if dk != h else None
    vch = sd((b, n_kv, hv), I32) if hv != h else None
    return args, ch, vch, sd((b, n_kv), I32)


# (id, B, N, K, H, C, S, Dk, Hv, dtype, window, R, max segment): a store of R rows read at
# offsets; R None is R = K rows with segments of up to C slots (max segment None: C). A Llama-3-8B layer at 32k slots
# (its own rows; a segment of a one-row store of 8 heads x 4 layers; a two-row store with a
# window), a GQA-3 odd-capacity thin-key case in f32 with a window, and thin keys + values at
# H=128 (the largest shared-memory footprint of the GPU kernel), each also as R = 1 / R = K
# with offsets.
DECODE = [
    ("llama3_8b_32k", 1, 32, 8, 128, 32768, 256, 128, 128, BF16, None, None, None),
    ("llama3_8b_store_rows1", 1, 32, 8, 128, 8 * 4 * 8192, 256, 128, 128, BF16, None, 1, 32768),
    ("llama3_8b_store_rows2_window", 1, 32, 8, 128, 4 * 4 * 8192, 256, 128, 128, BF16, 4096, 2,
     8192),
    ("gqa3_odd_thinK_f32_window", 2, 6, 2, 64, 37, 5, 32, 64, jnp.float32, 4096, None, None),
    ("gqa3_odd_thinK_f32_window_rows1", 2, 6, 2, 64, 37, 5, 32, 64, jnp.float32, 4096, 1, 19),
    ("thinKV_h128", 2, 24, 3, 128, 1001, 300, 112, 96, BF16, None, None, None),
    ("thinKV_h128_rows1", 2, 24, 3, 128, 3003, 300, 112, 96, BF16, None, 1, 1001),
    ("thinKV_h128_rowsK_offsets", 2, 24, 3, 128, 1001, 300, 112, 96, BF16, None, 3, 517),
]


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
@pytest.mark.parametrize("case", DECODE, ids=[c[0] for c in DECODE])
def test_decode_lowers(platform, module, case):
    _, b, n, n_kv, h, c, s, dk, hv, dtype, window, rows, seg = case
    args, ch, vch, off = _decode_specs(b, n, n_kv, h, c, s, dk, hv, dtype, rows)

    def f(*a, ch=None, vch=None, off):
        return module.decode_attention(*a, channels=ch, value_channels=vch,
                                       sliding_window=window, prefix_offset=off,
                                       max_prefix_len=seg, interpret=False)
    exported = export.export(jax.jit(f), platforms=(platform,))(*args, ch=ch, vch=vch, off=off)
    assert exported.out_avals[0].shape == (b, n, h)


# presses whose stores differ: per-head segments (AdaKV), head groups (UNComp), thin keys
# (ThinK: Dk = 64 of H = 128)
REAL_PRESSES = {
    "adakv": kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.75)),
    "uncomp": kvjax.UNCompPress(compression_ratio=0.75, groups=2),
    "think": kvjax.ThinKPress(key_channel_compression_ratio=0.5,
                              press=kvjax.SnapKVPress(compression_ratio=0.5)),
}


@pytest.fixture(scope="module")
def gqa4_model():
    """Llama-3-8B attention shapes (N 32, K 8, H 128) on 3 narrow layers, bf16."""
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=32, n_kv_heads=8, head_dim=128,
                                  d_model=64, mlp_dim=64, vocab_size=97, max_seq_len=8192)
    return models.Decoder(cfg, dtype=BF16, rngs=nnx.Rngs(0)).kvjax_split()


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
@pytest.mark.parametrize("press_name", list(REAL_PRESSES))
def test_decode_on_a_real_store_lowers(platform, module, press_name, gqa4_model):
    """The kernel call kvjax.dispatch makes, on the store `kvjax.compress` writes for a 2-row
    batch of 4096-token prompts (its shapes from jax.eval_shape: nothing is run), every
    layer in a lax.scan (a traced layer index, as in the model), lowered for TPU / CUDA."""
    fn, params = gqa4_model
    tokens, lengths = jnp.zeros((2, 4096), I32), jnp.array([4096, 3000], I32)
    _, cache = jax.eval_shape(lambda p: loops.prefill(
        fn, p, tokens, lengths, tail_capacity=256, press=REAL_PRESSES[press_name]), params)
    store = cache.store
    assert store.rows == 1 and store.k.shape[1:] == (1, store.slots, store.k.shape[3])
    assert store.offset.shape == (2, 3, 8) and store.slots % 8 == 0
    assert (store.k.shape[3] == 64) == (press_name == "think")
    q = jax.ShapeDtypeStruct((2, 32, 128), BF16)
    q_pos = jax.ShapeDtypeStruct((2,), I32)

    def f(cache, q, q_pos):
        st, tail = cache.store, cache.tail
        pick = lambda x, l: None if x is None else x[:, l]

        def body(_, layer):
            out = module.decode_attention(
                q, st.k, st.v, st.length[:, layer], st.pos, tail.k[layer], tail.v[layer],
                tail.pos, tail.count, q_pos, channels=pick(st.channels, layer),
                value_channels=pick(st.value_channels, layer),
                prefix_offset=st.offset[:, layer], max_prefix_len=st.max_segment,
                interpret=False)
            return None, out

        return jax.lax.scan(body, None, jnp.arange(cache.n_layers))[1]

    exported = export.export(jax.jit(f), platforms=(platform,))(cache, q, q_pos)
    assert exported.out_avals[0].shape == (3, 2, 32, 128)


# (id, B, T, N, K, H, dtype, window, score_rows)
PREFILL = [
    ("llama3_8b_8k_all", 1, 8192, 32, 8, 128, BF16, None, AllRows()),
    ("mistral_window_snapkv", 2, 1000, 24, 3, 64, jnp.float32, 256, LastRows(32)),
    ("nacl_proxy_rows", 2, 1000, 8, 2, 64, BF16, None,
     ProxyRows(jax.ShapeDtypeStruct((2, 10), I32))),
]


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
@pytest.mark.parametrize("case", PREFILL, ids=[c[0] for c in PREFILL])
def test_prefill_lowers(platform, module, case):
    _, b, t, n, n_kv, h, dtype, window, rows = case
    sd = jax.ShapeDtypeStruct

    def f(q, k, v, lengths, rows):  # ProxyRows' rows are a traced argument
        return module.prefill_attention_with_scores(q, k, v, lengths, sliding_window=window,
                                                    score_rows=rows, interpret=False)
    exported = export.export(jax.jit(f), platforms=(platform,))(
        sd((b, t, n, h), dtype), sd((b, t, n_kv, h), dtype), sd((b, t, n_kv, h), dtype),
        sd((b,), I32), rows)
    assert [a.shape for a in exported.out_avals] == [(b, t, n, h), (b, n, t)]


def test_gpu_lowering_rejects_too_much_shared_memory():
    """block_kv=128 at H=128 needs more than sm90's 227 KiB of SMEM: lowering says so."""
    args, _, _, off = _decode_specs(1, 32, 8, 128, 8192, 256, 128, 128, BF16)

    def f(*a):
        return gpu.decode_attention(*a[:-1], prefix_offset=a[-1],
                                    block_sizes=gpu.DecodeBlockSizes(block_kv=128),
                                    interpret=False)

    with pytest.raises(Exception, match="shared memory"):
        export.export(jax.jit(f), platforms=("cuda",))(*args, off)
