"""Decode kernels reading a store shared by the batch (the engine's pool), vs their spec.

The engine (kvjax/engine/pool.py) keeps one batch-1 store, k, v [1, R, P, D], pos [1, R, P]
(and per-entry scales [1, R, P] for an int8 / fp8 pool), read by b running slots, each with
its own table (offset, length [b, L, K]), tail and position. The kernels take that store as it
is (batch 1) with the slots' queries, tables and tails (batch b). The spec is
`cached_attention_reference` over each slot's own segments gathered by a numpy loop.

Layouts: the segments of every (slot, layer, kv head) of a row in a shuffled order with free
slots between them (so different slots' segments interleave), poisoned free slots (large keys
a leak would make dominate), ragged lengths, a slot whose store part is empty (length 0, tail
tokens only) and an idle slot with nothing at all (zeros out). Then `kvjax.Engine` with the
TPU kernel (interpret mode) against `kvjax.generate` with the reference.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import kvjax
import models
from kvjax import dispatch
from kvjax.attention import cached_attention_reference
from kvjax.cache import (KVCache, KVStore, LayerView, Tail, dequantize_store, head_rows,
                         quantize_store)
from kvjax.quant import KVQuant, TokenScales
from pallas_kernels import _interpret, gpu, tpu

SLOTS = 4  # b: slot 2 keeps nothing in the store, slot 3 is idle (nothing anywhere)
GPU_MISSING = _interpret.GPU_INTERPRET_UNAVAILABLE

# (id, G, H, K, R, L, max segment, dtype, window)
CASES = [
    ("rows2_g2_f32", 2, 64, 2, 2, 2, 40, jnp.float32, None),
    ("rows1_g3_bf16_window", 3, 64, 2, 1, 2, 37, jnp.bfloat16, 30),
]


def shared_layout(length: np.ndarray, rows: int, rng) -> tuple[np.ndarray, int]:
    """Offsets [b, L, K] into one shared row per store row: every (slot, layer, head) segment
    of the row in a random order, 0-3 free slots before each; and P (the end, rounded to 8)."""
    b, n_layers, n_kv = length.shape
    offset = np.zeros_like(length)
    ends = []
    for r in range(rows):
        segs = [(s, l, h) for s in range(b) for l in range(n_layers) for h in range(n_kv)
                if head_rows(n_kv, rows)[h] == r]
        cur = 0
        for i in rng.permutation(len(segs)):
            s, l, h = segs[i]
            cur += int(rng.integers(0, 4))
            offset[s, l, h] = cur
            cur += length[s, l, h]
        ends.append(cur)
    return offset, -(-max(ends) // 8) * 8


def make_pool(g, h, n_kv, rows, n_layers, max_seg, dtype, window, seed=0):
    """(store with batch 1 and a [b, L, K] table, tail [L, b, K, S, H], q [b, N, H], q_pos)."""
    rng = np.random.default_rng(seed)
    length = rng.integers(1, max_seg + 1, (SLOTS, n_layers, n_kv))
    length[0, -1, 0] = max_seg
    length[1, 0, -1] = 0  # one empty head
    length[2:] = 0  # slot 2: tail only; slot 3: idle
    offset, p = shared_layout(length, rows, rng)
    k = rng.normal(size=(1, rows, p, h))
    used = np.zeros((1, rows, p), bool)
    for s, l, hh in np.ndindex(SLOTS, n_layers, n_kv):
        used[0, head_rows(n_kv, rows)[hh], offset[s, l, hh]:offset[s, l, hh] + length[s, l, hh]] = 1
    k = np.where(used[..., None], k, 30.0 * np.abs(k))
    store = KVStore(k=jnp.asarray(k, jnp.float32).astype(dtype),
                    v=jnp.asarray(rng.normal(size=(1, rows, p, h)), jnp.float32).astype(dtype),
                    pos=jnp.asarray(rng.integers(0, 2 * p, (1, rows, p)), jnp.int32),
                    offset=jnp.asarray(offset, jnp.int32), length=jnp.asarray(length, jnp.int32),
                    max_segment=max_seg)
    s_cap = 5
    ks = jax.random.split(jax.random.key(seed + 1), 3)
    shape = (n_layers, SLOTS, n_kv, s_cap, h)
    count = jnp.array([s_cap, 2, 3, 0], jnp.int32)
    tail = Tail(jax.random.normal(ks[0], shape).astype(dtype),
                jax.random.normal(ks[1], shape).astype(dtype),
                2 * p + jnp.broadcast_to(jnp.arange(s_cap, dtype=jnp.int32), (SLOTS, s_cap)),
                count)
    q = jax.random.normal(ks[2], (SLOTS, g * n_kv, h)).astype(dtype)
    return store, tail, q, 2 * p + jnp.maximum(count, 1) - 1


def slot_views(store: KVStore, layer: int) -> LayerView:
    """Every slot's own segments of layer `layer`, gathered from store batch 0 by a numpy
    loop: [b, K, max_segment] (zero padded)."""
    f32 = lambda x: np.asarray(x.astype(jnp.float32) if x.dtype != jnp.int32 else x)
    k, v, pos = f32(store.k)[0], f32(store.v)[0], f32(store.pos)[0]
    off, ln = np.asarray(store.offset[:, layer]), np.asarray(store.length[:, layer])
    b, n_kv = ln.shape
    m = store.max_segment
    out = {"k": np.zeros((b, n_kv, m, k.shape[-1]), np.float32),
           "v": np.zeros((b, n_kv, m, v.shape[-1]), np.float32),
           "pos": np.zeros((b, n_kv, m), np.int32)}
    rows = head_rows(n_kv, store.rows)
    for s, hh in np.ndindex(b, n_kv):
        sl = slice(off[s, hh], off[s, hh] + ln[s, hh])
        for name, x in (("k", k), ("v", v), ("pos", pos)):
            out[name][s, hh, :ln[s, hh]] = x[rows[hh], sl]
    return LayerView(k=jnp.asarray(out["k"]), v=jnp.asarray(out["v"]),
                     pos=jnp.asarray(out["pos"]), length=jnp.asarray(ln))


def kernel_args(q, q_pos, store, tail, layer):
    """The call kvjax.dispatch makes: the shared store whole, the slots' table columns."""
    t = tail.layer(layer)
    scales = {} if store.quant is None else dict(prefix_k_scale=store.k_scale,
                                                  prefix_v_scale=store.v_scale)
    return (q, store.k, store.v, store.length[:, layer], store.pos, t.k, t.v, t.pos, t.count,
            q_pos), dict(prefix_offset=store.offset[:, layer], max_prefix_len=store.max_segment,
                         **scales)


def reference(q, q_pos, store, tail, layer, window):
    ref_store = dequantize_store(store)
    return cached_attention_reference(q[:, None].astype(jnp.float32), q_pos[:, None],
                                      slot_views(ref_store, layer), tail.layer(layer),
                                      sliding_window=window)[:, 0]


class PoolChecks:
    """Checks shared by both kernels; subclasses set `run`, the tolerances and the cases."""

    ATOL: ClassVar[dict] = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

    def run(self, *args, **kwargs):
        raise NotImplementedError

    def check(self, case, quant=None):
        _, g, h, n_kv, rows, n_layers, max_seg, dtype, window = case
        store, tail, q, q_pos = make_pool(g, h, n_kv, rows, n_layers, max_seg, dtype, window)
        if quant is not None:
            store = quantize_store(store, quant)
        assert store.k.shape[0] == 1 and store.offset.shape[0] == q.shape[0] == SLOTS
        atol = self.ATOL[dtype]
        for layer in range(n_layers):
            args, kw = kernel_args(q, q_pos, store, tail, layer)
            out = self.run(*args, sliding_window=window, **kw)
            ref = reference(q, q_pos, store, tail, layer, window)
            assert out.shape == (SLOTS, g * n_kv, h) and out.dtype == dtype
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                       atol=atol, rtol=0 if atol < 1e-3 else atol,
                                       err_msg=f"layer {layer}")
            assert not np.any(np.asarray(out, np.float32)[3]), "an idle slot gives zeros"

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_every_slot_reads_its_own_segments(self, case):
        self.check(case)


class TestPoolDecodeTPUInterpret(PoolChecks):
    """Mosaic TPU kernel in TPU interpret mode, float and int8 / fp8 per-entry scales."""

    def run(self, *args, **kwargs):
        return tpu.decode_attention(
            *args, block_sizes=tpu.DecodeBlockSizes(block_prefix=128, block_tail=128),
            interpret=True, **kwargs)

    @pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
    def test_quantized_pool(self, dtype):
        self.check(CASES[0], KVQuant(dtype, TokenScales()))


@pytest.mark.skipif(bool(GPU_MISSING), reason=str(GPU_MISSING))
class TestPoolDecodeGPUInterpret(PoolChecks):
    """Mosaic GPU kernel in the Mosaic GPU interpreter (16-bit MMA inputs: 2e-2)."""

    ATOL: ClassVar[dict] = {jnp.float32: 2e-2, jnp.bfloat16: 2e-2}

    def run(self, *args, **kwargs):
        return gpu.decode_attention(*args, interpret=True, **kwargs)


def test_rejects_a_store_batch_that_is_neither_1_nor_b():
    store, tail, q, q_pos = make_pool(2, 64, 2, 2, 2, 40, jnp.float32, None)
    args, kw = kernel_args(q, q_pos, store, tail, 0)
    two = lambda x: jnp.concatenate([x, x])
    bad = (args[0], two(args[1]), two(args[2]), args[3], two(args[4])) + args[5:]
    for kernel in (tpu, gpu):
        with pytest.raises(ValueError, match=r"prefix_k.shape=\(2,"):
            kernel.decode_attention(*bad, **kw, interpret=True)


@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
def test_shared_store_lowers(platform, module):
    """A Llama-3-8B layer's pool (one row per kv head, 64k slots, bf16) read by 8 slots,
    lowered for TPU / CUDA (jax.export: nothing runs); the TPU kernel also int8."""
    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    b, n, n_kv, h, p, s = 8, 32, 8, 128, 65536, 256
    kinds = [jnp.bfloat16] + ([jnp.int8] if platform == "tpu" else [])
    for kdt in kinds:
        args = (sd((b, n, h), jnp.bfloat16), sd((1, n_kv, p, h), kdt), sd((1, n_kv, p, h), kdt),
                sd((b, n_kv), i32), sd((1, n_kv, p), i32), sd((b, n_kv, s, h), jnp.bfloat16),
                sd((b, n_kv, s, h), jnp.bfloat16), sd((b, s), i32), sd((b,), i32),
                sd((b,), i32))
        scales = {} if kdt == jnp.bfloat16 else dict(
            ks=sd((1, n_kv, p), jnp.float32), vs=sd((1, n_kv, p), jnp.float32))

        def f(*a, off, ks=None, vs=None):
            kw = {} if ks is None else dict(prefix_k_scale=ks, prefix_v_scale=vs)
            return module.decode_attention(*a, prefix_offset=off, max_prefix_len=8192,
                                           interpret=False, **kw)

        exported = export.export(jax.jit(f), platforms=(platform,))(
            *args, off=sd((b, n_kv), i32), **scales)
        assert exported.out_avals[0].shape == (b, n, h)


def test_dispatch_sends_a_shared_store_to_the_kernel(monkeypatch):
    """`dispatch.decode_attention` calls the kernel for a batch-1 store read by b slots
    (one query each) and equals the reference; a two-token extend stays on the jnp walk."""
    store, tail, q, q_pos = make_pool(2, 64, 2, 2, 2, 40, jnp.float32, None)
    cache = KVCache(store=store, tail=tail, next_pos=q_pos + 1)
    calls = []
    real = tpu.decode_attention
    monkeypatch.setattr(tpu, "decode_attention", lambda *a, **k: calls.append(1) or real(
        *a, block_sizes=tpu.DecodeBlockSizes(128, 128), **k))
    out = dispatch.decode_attention(q[:, None], q_pos[:, None], cache, 1, attn_impl="pallas_tpu")
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(out[:, 0]),
                               np.asarray(reference(q, q_pos, store, tail, 1, None)), atol=1e-5)
    q2 = jnp.concatenate([q[:, None], q[:, None]], axis=1)
    jax.eval_shape(lambda: dispatch.decode_attention(q2, jnp.stack([q_pos - 1, q_pos], 1),
                                                     cache, 1, attn_impl="pallas_tpu"))
    assert calls == [1]


VOCAB = 101


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=VOCAB)
    return models.Decoder(cfg, rngs=nnx.Rngs(1))


def test_engine_with_the_tpu_kernel_equals_generate(model, monkeypatch):
    """`kvjax.Engine(attn_impl="pallas_tpu")` (the TPU kernel in interpret mode reading the
    shared pool, batch 1, for all running slots) gives each of 3 requests of mixed lengths,
    SnapKV and the full cache, the greedy tokens of `kvjax.generate` with the reference
    alone."""
    shapes = []  # (store batch, query batch) of every traced kernel call
    real = tpu.decode_attention
    monkeypatch.setattr(tpu, "decode_attention", lambda q, k, *a, **kw: shapes.append(
        (k.shape[0], q.shape[0])) or real(q, k, *a, **kw))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(1, VOCAB, n)) for n in (23, 50, 35)]
    snap = kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)
    presses = [snap, None, snap]
    news = [4, 3, 5]
    eng = kvjax.Engine(model, kv_budget=2**19, max_running=3, max_tail=16,
                       attn_impl="pallas_tpu")
    assert eng.attn_impl == "pallas_tpu"
    reqs = [eng.submit(ids, press=press, max_new_tokens=n)
            for ids, press, n in zip(prompts, presses, news)]
    eng.run()
    for req, ids, press, n in zip(reqs, prompts, presses, news):
        out = kvjax.generate(model, [ids], max_new_tokens=n, press=press,
                             attn_impl="reference")
        assert req.result().tokens == out.tokens[0, :out.lengths[0]].tolist(), (req.id, press)
    assert (1, 3) in shapes, shapes  # 3 running slots read the batch-1 pool in the kernel
