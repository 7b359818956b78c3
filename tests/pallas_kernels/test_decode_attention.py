"""Decode attention kernels vs their spec, `kvjax.attention.cached_attention_reference` (T=1).

This file calls the kernels on the simplest store: one row per kv head (R = K), each head's
segment at offset 0 of its own row (`prefix_offset` zeros), the layout of a `LayerView`. Stores
of R | K rows with segments at other offsets are test_store_decode.py.

JAX's pattern: `TestDecodeTPU` / `TestDecodeGPU` run compiled on their backend and skip
elsewhere; their `...Interpret` subclasses rerun every check in interpret mode on CPU (TPU
interpreter / Mosaic GPU interpreter), which is CI's coverage of the kernels.

Tolerances (max abs error against the f32-accumulating reference run on the same inputs):
  * TPU kernel: f32 1e-5, bf16 2e-2 (+ 2e-2 relative).
  * GPU kernel: 2e-2 (+ 2e-2 relative) for both dtypes: WGMMA takes 16-bit inputs, so f32
    inputs are rounded to bf16 (documented in the kernel), and P is rounded to the value dtype
    before P @ V; the hand-computed case checks 5e-3.
"""

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import cached_attention_reference
from kvjax.cache import LayerView, Tail
from pallas_kernels import _interpret, gpu, tpu

B, K = 2, 2

# (id, G, H, C, S, dtype, Dk or None, Hv or None, sliding_window): GQA 1/3/4/8, H 64/128,
# odd capacities, thin keys, thin keys+values, windows, multi-block prefix and tail.
CASES = [
    ("g1_h64_f32", 1, 64, 37, 5, jnp.float32, None, None, None),
    ("g3_h128_bf16_thinK", 3, 128, 45, 9, jnp.bfloat16, 64, None, None),
    ("g4_h64_f32_window_multiblock", 4, 64, 201, 130, jnp.float32, None, None, 50),
    ("g8_h128_bf16_thinKV", 8, 128, 77, 3, jnp.bfloat16, 96, 64, None),
    ("g4_h128_f32_thinK_window", 4, 128, 129, 17, jnp.float32, 48, None, 40),
    ("g8_h64_bf16", 8, 64, 263, 5, jnp.bfloat16, None, None, None),
]


def make_case(g, h, c, s, dtype, dk=None, hv=None, seed=0):
    """A random cache; kv head 1 of sequence 0 has no valid prefix slot (zero-length head)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    n = g * K
    dk, hv = dk or h, hv or h
    q = jax.random.normal(ks[0], (B, n, h), jnp.float32).astype(dtype)
    pk = jax.random.normal(ks[1], (B, K, c, dk), jnp.float32).astype(dtype)
    pv = jax.random.normal(ks[2], (B, K, c, hv), jnp.float32).astype(dtype)
    lengths = jnp.array([[c, 0], [c // 2 + 1, 3]], jnp.int32)
    # compressed prefix: increasing original positions spread over 2C prompt tokens
    pos = jnp.sort(jax.random.choice(ks[3], 2 * c, (B, K, c), replace=True), axis=-1)
    counts = jnp.array([s, max(s - 2, 1)], jnp.int32)
    tail_pos = 2 * c + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (B, s))
    tk = jax.random.normal(ks[4], (B, K, s, h), jnp.float32).astype(dtype)
    tv = jax.random.normal(ks[5], (B, K, s, h), jnp.float32).astype(dtype)
    q_pos = 2 * c + counts - 1
    channels = value_channels = None
    if dk != h:
        channels = jnp.sort(jax.random.permutation(ks[6], h)[:dk])
        channels = jnp.broadcast_to(channels, (B, K, dk)).astype(jnp.int32)
    if hv != h:
        value_channels = jnp.sort(jax.random.permutation(ks[7], h)[:hv])
        value_channels = jnp.broadcast_to(value_channels, (B, K, hv)).astype(jnp.int32)
    prefix = LayerView(pk, pv, pos.astype(jnp.int32), lengths, channels, value_channels)
    return q, q_pos, (prefix, Tail(tk, tv, tail_pos, counts))


def reference(q, q_pos, layer, **kw):
    prefix, tail = layer
    return cached_attention_reference(q[:, None], q_pos[:, None], prefix, tail, **kw)[:, 0]


def kernel_args(q, q_pos, layer):
    """The kernel's R = K call: store k, v [B, K, C, D], pos [B, K, C], offsets 0."""
    p, t = layer
    return (q, p.k, p.v, p.length, p.pos, t.k, t.v, t.pos, t.count, q_pos), {
        "channels": p.channels, "value_channels": p.value_channels,
        "prefix_offset": jnp.zeros(p.length.shape, jnp.int32)}


class DecodeChecks:
    """Checks shared by every backend; subclasses set `run` and tolerances."""

    INTERPRET = False
    ATOL: ClassVar[dict] = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
    HAND_ATOL = 1e-6

    def run(self, *args, **kwargs):
        raise NotImplementedError

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_reference(self, case):
        _, g, h, c, s, dtype, dk, hv, window = case
        q, q_pos, layer = make_case(g, h, c, s, dtype, dk, hv)
        args, kw = kernel_args(q, q_pos, layer)
        out = self.run(*args, sliding_window=window, **kw)
        ref = reference(q, q_pos, layer, sliding_window=window)
        assert out.shape == ref.shape == (B, g * K, h) and out.dtype == dtype
        atol = self.ATOL[dtype]
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=atol, rtol=0 if atol < 1e-3 else atol)

    def test_empty_cache_gives_zeros(self):
        """A sequence with no valid prefix slot in any head and an empty tail -> zeros."""
        q, q_pos, layer = make_case(4, 64, 37, 5, jnp.float32)
        p, t = layer
        layer = (LayerView(p.k, p.v, p.pos, p.length.at[1].set(0)),
                 Tail(t.k, t.v, t.pos, t.count.at[1].set(0)))
        args, kw = kernel_args(q, q_pos, layer)
        out = np.asarray(self.run(*args, **kw))
        assert np.all(out[1] == 0) and np.all(np.isfinite(out))
        np.testing.assert_allclose(out, np.asarray(reference(q, q_pos, layer)), atol=2e-2)

    def test_hand_computed(self):
        """B=N=K=1, H=16 (only the first channels are non-zero), scale 1/4.

        q = 4*e0. Prefix (capacity 3, length 2): k = [0, e0, 100*e0] -> logits 0, 1 and a
        masked slot whose huge logit must not leak. Tail (capacity 2, count 1): k = 0 -> logit
        0; its second slot (logit 0) lies beyond count. Weights e^0 : e^1 : e^0, so with values
        v = e0, e1 (prefix) and e2 (tail) the output is [1, e, 1] / (2 + e) on channels 0..2.
        """
        h = 16
        e0, e1, e2 = (jnp.eye(h)[i] for i in range(3))
        q = (4.0 * e0)[None, None]
        pk = jnp.stack([0 * e0, e0, 100 * e0])[None, None]
        pv = jnp.stack([e0, e1, 7 * e1])[None, None]
        tk = jnp.stack([0 * e0, 0 * e0])[None, None]
        tv = jnp.stack([e2, 9 * e2])[None, None]
        out = self.run(q, pk, pv, jnp.array([[2]]), jnp.array([[[0, 1, 2]]]), tk, tv,
                       jnp.array([[3, 4]]), jnp.array([1]), jnp.array([3]), scale=0.25,
                       prefix_offset=jnp.zeros((1, 1), jnp.int32))
        want = np.zeros(h, np.float32)
        want[:3] = np.array([1.0, math.e, 1.0]) / (2.0 + math.e)
        np.testing.assert_allclose(np.asarray(out)[0, 0], want, atol=self.HAND_ATOL)

    def test_rejects_bad_shapes(self):
        q, q_pos, layer = make_case(1, 64, 37, 5, jnp.float32)
        args, kw = kernel_args(q, q_pos, layer)
        with pytest.raises(ValueError, match="prefix_len"):
            self.run(*args[:3], args[3][..., None], *args[4:], **kw)
        with pytest.raises(ValueError, match="prefix_pos"):  # positions follow the R rows
            self.run(*args[:4], args[4][:, :1], *args[5:], **kw)
        with pytest.raises(ValueError, match="prefix_offset"):
            self.run(*args, **{**kw, "prefix_offset": jnp.zeros((B, K + 1), jnp.int32)})
        with pytest.raises(ValueError, match="max_prefix_len"):
            self.run(*args, max_prefix_len=args[1].shape[2] + 1, **kw)

    def test_needs_segment_offsets(self):
        """One calling convention: the store and its segments' offsets."""
        q, q_pos, layer = make_case(1, 64, 37, 5, jnp.float32)
        args, kw = kernel_args(q, q_pos, layer)
        with pytest.raises(ValueError, match="prefix_offset=None"):
            self.run(*args, **{**kw, "prefix_offset": None})
        with pytest.raises(TypeError, match="prefix_offset"):
            self.run(*args, **{k: v for k, v in kw.items() if k != "prefix_offset"})

    def test_rejects_too_few_prefix_lengths(self):
        q, q_pos, layer = make_case(1, 64, 37, 5, jnp.float32)
        args, kw = kernel_args(q, q_pos, layer)
        with pytest.raises(ValueError, match="prefix_len"):
            self.run(*args[:3], args[3][:, :1], *args[4:], **kw)

    def test_rejects_rows_not_dividing_heads(self):
        """K = 4 kv heads cannot be spread over R = 3 prefix rows."""
        q, q_pos, layer = make_case(1, 64, 37, 5, jnp.float32)
        args, kw = kernel_args(q, q_pos, layer)
        rows3 = lambda x: jnp.concatenate([x, x[:, :1]], axis=1)  # [B, 3, ...]
        heads4 = lambda x: jnp.concatenate([x, x], axis=1)  # [B, 4, ...]
        with pytest.raises(ValueError, match="must divide"):
            self.run(jnp.concatenate([q, q], 1), rows3(args[1]), rows3(args[2]),
                     heads4(args[3]), rows3(args[4]), heads4(args[5]), heads4(args[6]),
                     *args[7:], **kw)


class TestDecodeTPU(DecodeChecks):
    """Mosaic TPU kernel, compiled (skips without a TPU)."""

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() != "tpu":
            pytest.skip("no TPU backend: covered by TestDecodeTPUInterpret")

    def run(self, *args, **kwargs):
        kwargs.setdefault("block_sizes", tpu.DecodeBlockSizes(block_prefix=128, block_tail=128))
        return tpu.decode_attention(*args, interpret=self.INTERPRET, **kwargs)


class TestDecodeTPUInterpret(TestDecodeTPU):
    """The same checks in TPU interpret mode (pltpu.InterpretParams) on CPU."""

    INTERPRET = True


class TestDecodeGPU(DecodeChecks):
    """Mosaic GPU kernel, compiled (skips without a GPU)."""

    ATOL: ClassVar[dict] = {jnp.float32: 2e-2, jnp.bfloat16: 2e-2}
    HAND_ATOL = 5e-3

    @pytest.fixture(autouse=True)
    def _backend(self):
        if self.INTERPRET and _interpret.GPU_INTERPRET_UNAVAILABLE:
            pytest.skip(_interpret.GPU_INTERPRET_UNAVAILABLE)
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("no GPU backend: covered by TestDecodeGPUInterpret")

    def run(self, *args, **kwargs):
        kwargs.setdefault("block_sizes", gpu.DecodeBlockSizes(block_kv=64, num_splits=2))
        return gpu.decode_attention(*args, interpret=self.INTERPRET, **kwargs)


class TestDecodeGPUInterpret(TestDecodeGPU):
    """The same checks in the Mosaic GPU interpreter (InterpretGPUParams) on CPU."""

    INTERPRET = True
