"""Decode kernels reading ZigZagKV's pooled prefix in place (`prefix_offset`), vs their spec.

The spec is `cached_attention_reference` over the gathered segment (`Pool.view`); the kernels
get the whole pool plus per-row offsets and must read only [offset, offset + length). JAX's
pattern as in test_decode_attention.py: the compiled classes skip off their backend, the
`...Interpret` subclasses run on CPU. Tolerances as there: TPU f32 1e-5, bf16 2e-2; GPU 2e-2
(WGMMA takes 16-bit inputs).
"""

import functools
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import kvjax
import models
from kvjax import dispatch, loops
from kvjax.attention import cached_attention_reference
from kvjax.cache import LayerCache, Pool, PoolSegment, Tail
from kvjax.presses.zigzag import pool_slots
from pallas_kernels import _interpret, gpu, tpu

B, K = 2, 2
GPU_MISSING = _interpret.GPU_INTERPRET_UNAVAILABLE

# (id, G, H, budgets [B][L] (ragged per row: unaligned offsets), pool slots P, dtype, window)
CASES = [
    ("g1_h64_f32_odd_pool", 1, 64, ((37, 100, 150), (120, 1, 166)), 293, jnp.float32, None),
    ("g4_h64_bf16_window", 4, 64, ((9, 130, 61), (64, 64, 72)), 200, jnp.bfloat16, 40),
    ("g8_h128_f32_tiny_segments", 8, 128, ((1, 2, 5), (3, 3, 2)), 8, jnp.float32, None),
]


def make_pool(budgets, p, h, dtype, seed=0):
    """A random pool [B, K, P, H] holding per-row ragged segments (offsets = cumsum)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    length = jnp.asarray(budgets, jnp.int32)  # [B, L]
    offset = jnp.cumsum(length, axis=1) - length
    if int(jnp.max(offset + length)) > p:
        raise ValueError(f"budgets {budgets} do not fit in P={p}")
    pos = jax.random.randint(ks[2], (B, K, p), 0, 2 * p, jnp.int32)
    return Pool(k=jax.random.normal(ks[0], (B, K, p, h), jnp.float32).astype(dtype),
                v=jax.random.normal(ks[1], (B, K, p, h), jnp.float32).astype(dtype),
                pos=pos, offset=offset, length=length, max_segment=int(jnp.max(length)))


def make_tail(g, h, dtype, p, s=5, seed=1):
    """A random tail after the pool's positions, and one query per row at its last slot."""
    ks = jax.random.split(jax.random.key(seed), 3)
    counts = jnp.array([s, s - 2], jnp.int32)
    tail = Tail(jax.random.normal(ks[0], (B, K, s, h), jnp.float32).astype(dtype),
                jax.random.normal(ks[1], (B, K, s, h), jnp.float32).astype(dtype),
                2 * p + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (B, s)), counts)
    q = jax.random.normal(ks[2], (B, g * K, h), jnp.float32).astype(dtype)
    return q, 2 * p + counts - 1, tail


def reference(q, q_pos, segment, tail, **kw):
    """The spec: attention over the gathered segment (Pool.view) and the tail."""
    layer = LayerCache(prefix=segment.view(), tail=tail)
    return cached_attention_reference(q[:, None], q_pos[:, None], layer, **kw)[:, 0]


def pool_args(q, q_pos, segment, tail):
    pool = segment.pool
    return (q, pool.k, pool.v, segment.length, pool.pos, tail.k, tail.v, tail.pos, tail.count,
            q_pos), {"prefix_offset": segment.offset, "max_prefix_len": segment.capacity}


class PoolChecks:
    """Checks shared by every backend; subclasses set `run` and tolerances."""

    INTERPRET = False
    ATOL: ClassVar[dict] = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
    HAND_ATOL = 1e-6

    def run(self, *args, **kwargs):
        raise NotImplementedError

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_every_segment_matches_reference(self, case):
        _, g, h, budgets, p, dtype, window = case
        pool = make_pool(budgets, p, h, dtype)
        q, q_pos, tail = make_tail(g, h, dtype, p)
        atol = self.ATOL[dtype]
        for layer in range(len(budgets[0])):
            seg = PoolSegment(pool=pool, layer=layer)
            args, kw = pool_args(q, q_pos, seg, tail)
            out = self.run(*args, sliding_window=window, **kw)
            ref = reference(q, q_pos, seg, tail, sliding_window=window)
            assert out.shape == ref.shape == (B, g * K, h) and out.dtype == dtype
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                       atol=atol, rtol=0 if atol < 1e-3 else atol,
                                       err_msg=f"layer {layer}")

    def test_hand_computed_neighbours_never_leak(self):
        """B=N=K=1, H=16, scale 1/4, q = 4*e0; pool of 8 slots, layer 1 = slots [2, 4).

        Layer 0's slots (0, 1) and the slots after the segment (4..7) hold k = 100*e0 (logit
        25, which would dominate if read). The segment holds k = [0, e0] -> logits 0, 1, and
        the tail (count 1) k = 0 -> logit 0. Weights e^0 : e^1 : e^0, values e0, e1 (segment)
        and e2 (tail): the output is [1, e, 1] / (2 + e) on channels 0..2.
        """
        h = 16
        e0, e1, e2 = (jnp.eye(h)[i] for i in range(3))
        big = 100 * e0
        pk = jnp.stack([big, big, 0 * e0, e0, big, big, big, big])[None, None]
        pv = jnp.stack([9 * e1, 9 * e1, e0, e1, 9 * e2, 9 * e2, 9 * e2, 9 * e2])[None, None]
        pool = Pool(k=pk, v=pv, pos=jnp.arange(8, dtype=jnp.int32)[None, None],
                    offset=jnp.array([[0, 2]]), length=jnp.array([[2, 2]]), max_segment=2)
        seg = PoolSegment(pool=pool, layer=1)
        tail = Tail(jnp.zeros((1, 1, 2, h)), jnp.stack([e2, 9 * e2])[None, None],
                    jnp.array([[8, 9]]), jnp.array([1]))
        args, kw = pool_args((4.0 * e0)[None, None], jnp.array([8]), seg, tail)
        out = self.run(*args, scale=0.25, **kw)
        want = np.zeros(h, np.float32)
        want[:3] = np.array([1.0, math.e, 1.0]) / (2.0 + math.e)
        np.testing.assert_allclose(np.asarray(out)[0, 0], want, atol=self.HAND_ATOL)

    def test_rejects_bad_pool_arguments(self):
        pool = make_pool(CASES[0][3], 293, 64, jnp.float32)
        q, q_pos, tail = make_tail(1, 64, jnp.float32, 293)
        args, kw = pool_args(q, q_pos, PoolSegment(pool=pool, layer=1), tail)
        with pytest.raises(ValueError, match="prefix_offset"):
            self.run(*args, **{**kw, "prefix_offset": kw["prefix_offset"][:, :1]})
        with pytest.raises(ValueError, match="max_prefix_len"):
            self.run(*args, **{**kw, "max_prefix_len": 294})


class TestPoolDecodeTPU(PoolChecks):
    """Mosaic TPU kernel, compiled (skips without a TPU)."""

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() != "tpu":
            pytest.skip("no TPU backend: covered by TestPoolDecodeTPUInterpret")

    def run(self, *args, **kwargs):
        kwargs.setdefault("block_sizes", tpu.DecodeBlockSizes(block_prefix=128, block_tail=128))
        return tpu.decode_attention(*args, interpret=self.INTERPRET, **kwargs)


class TestPoolDecodeTPUInterpret(TestPoolDecodeTPU):
    """The same checks in TPU interpret mode (pltpu.InterpretParams) on CPU."""

    INTERPRET = True


class TestPoolDecodeGPU(PoolChecks):
    """Mosaic GPU kernel, compiled (skips without a GPU)."""

    ATOL: ClassVar[dict] = {jnp.float32: 2e-2, jnp.bfloat16: 2e-2}
    HAND_ATOL = 5e-3

    @pytest.fixture(autouse=True)
    def _backend(self):
        if self.INTERPRET and GPU_MISSING:
            pytest.skip(GPU_MISSING)
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("no GPU backend: covered by TestPoolDecodeGPUInterpret")

    def run(self, *args, **kwargs):
        kwargs.setdefault("block_sizes", gpu.DecodeBlockSizes(block_kv=64, num_splits=2))
        return gpu.decode_attention(*args, interpret=self.INTERPRET, **kwargs)


class TestPoolDecodeGPUInterpret(TestPoolDecodeGPU):
    """The same checks in the Mosaic GPU interpreter (InterpretGPUParams) on CPU."""

    INTERPRET = True


IMPLS = [pytest.param("pallas_tpu"),
         pytest.param("pallas_gpu", marks=pytest.mark.skipif(GPU_MISSING is not None,
                                                             reason=str(GPU_MISSING)))]


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_reads_the_pool_without_a_gather(impl):
    """A PoolSegment prefix reaches the kernel as the whole pool: no gather in the jaxpr (the
    reference path gathers the segment) and the reference's output."""
    pool = make_pool(CASES[1][3], 200, 64, jnp.float32)
    q, q_pos, tail = make_tail(4, 64, jnp.float32, 200)
    layer = LayerCache(prefix=PoolSegment(pool=pool, layer=2), tail=tail)

    def attend(layer, attn_impl):
        return dispatch.decode_attention(q[:, None], q_pos[:, None], layer, attn_impl=attn_impl)

    jaxpr = str(jax.make_jaxpr(lambda l: attend(l, impl))(layer))
    assert re.search(r"\b(pallas_call|mpmd_map)\b", jaxpr) and not re.search(r"\bgather\b", jaxpr)
    assert re.search(r"\bgather\b", str(jax.make_jaxpr(lambda l: attend(l, "reference"))(layer)))
    np.testing.assert_allclose(np.asarray(attend(layer, impl)),
                               np.asarray(attend(layer, "reference")),
                               atol=2e-2 if impl == "pallas_gpu" else 1e-5)


def test_pool_segment_reads_like_a_prefix():
    """KVCache.layer(i) of a pooled cache: a PoolSegment whose fields gather the segment."""
    pool = make_pool(CASES[0][3], 293, 64, jnp.float32)
    seg = PoolSegment(pool=pool, layer=1)
    view = pool.view(1)
    for name in ("k", "v", "pos", "length"):
        np.testing.assert_array_equal(np.asarray(getattr(seg, name)),
                                      np.asarray(getattr(view, name)))
    assert seg.capacity == view.capacity == 166 and seg.channels is None
    np.testing.assert_array_equal(np.asarray(seg.offset), [[37, 37], [120, 120]])
    assert pool_slots(293) == 296 and pool_slots(296) == 296


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97,
                                  max_seq_len=256)
    return models.Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(1)
    return [list(rng.randint(0, 97, n)) for n in (17, 9, 30)]


ZIGZAG = kvjax.ZigZagKVPress(compression_ratio=0.5, window_size=4)


@pytest.fixture(scope="module")
def zigzag_reference(tiny, prompts):
    return kvjax.generate(tiny, prompts, max_new_tokens=4, press=ZIGZAG,
                          attn_impl="reference").tokens


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_zigzag_with_pool_kernel_matches_reference(tiny, prompts, zigzag_reference,
                                                            impl):
    """ZigZagKV's pooled cache through generate: same greedy tokens as the reference, and
    the pooled decode layer reaches the kernel with no gather of its segment."""
    fn, params = tiny.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    _, cache = loops.prefill(fn, params, tokens, lengths, tail_capacity=8, press=ZIGZAG)
    assert cache.pool is not None and cache.pool.k.shape[2] % 8 == 0
    budgets = np.asarray(cache.pool.length)
    assert len({tuple(r) for r in budgets}) > 1  # ragged: per-row budget vectors differ
    layer = cache.layer(1)
    q = jnp.ones((len(prompts), 1, 4, 16))
    kv = jnp.ones((len(prompts), 1, 2, 16))
    jaxpr = str(jax.make_jaxpr(lambda c: kvjax.decode_layer(
        q, kv, kv, c.tail.pos[:, :1], jnp.ones(len(prompts), jnp.int32), c,
        attn_impl=impl)[0])(layer))
    assert not re.search(r"\bgather\b", jaxpr)
    def decode_step(p, c, attn_impl):
        b = len(prompts)
        return fn.decode(p, jnp.zeros((b, 1), jnp.int32), jnp.ones(b, jnp.int32), c,
                         attn_impl=attn_impl)

    step = {i: str(jax.make_jaxpr(functools.partial(decode_step, attn_impl=i))(params, cache))
            for i in (impl, "reference")}
    gathers = {i: len(re.findall(r"\bgather\b", j)) for i, j in step.items()}
    assert re.search(r"\b(pallas_call|mpmd_map)\b", step[impl])  # the model's decode step
    assert gathers[impl] < gathers["reference"]  # only the embedding lookup is left
    out = kvjax.generate(tiny, prompts, max_new_tokens=4, press=ZIGZAG, attn_impl=impl)
    np.testing.assert_array_equal(out.tokens, zigzag_reference)


SD, I32, BF16 = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16


@pytest.mark.parametrize("window", [None, 4096], ids=["full", "window"])
@pytest.mark.parametrize("platform,module", [("tpu", tpu), ("cuda", gpu)], ids=["tpu", "cuda"])
def test_pooled_decode_lowers(platform, module, window):
    """A Llama-3-8B layer reading its segment (<= 32k slots) of a 32-layer pool, compiled
    lowering for real TPU / CUDA (jax.export on CPU, as test_lowering.py)."""
    b, n, n_kv, h, s, seg = 1, 32, 8, 128, 256, 32768
    p = pool_slots(32 * 3277 + 3)
    args = (SD((b, n, h), BF16), SD((b, n_kv, p, h), BF16), SD((b, n_kv, p, h), BF16),
            SD((b, n_kv), I32), SD((b, n_kv, p), I32), SD((b, n_kv, s, h), BF16),
            SD((b, n_kv, s, h), BF16), SD((b, s), I32), SD((b,), I32), SD((b,), I32),
            SD((b, n_kv), I32))

    def f(*a):
        return module.decode_attention(*a[:-1], prefix_offset=a[-1], max_prefix_len=seg,
                                       sliding_window=window, interpret=False)
    exported = export.export(jax.jit(f), platforms=(platform,))(*args)
    assert exported.out_avals[0].shape == (b, n, h)
