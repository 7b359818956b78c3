"""Prefill-with-scores kernels vs their spec,
`kvjax.attention_scores.prefill_attention_with_scores_reference`.

`TestPrefillTPU` / `TestPrefillGPU` run compiled on their backend and skip elsewhere; their
`...Interpret` subclasses rerun every check in interpret mode on CPU.

Tolerances (max abs error; colsums are sums of up to T probabilities):
  * TPU kernel: out f32 1e-5 / bf16 2e-2 (+2e-2 relative); colsums 5e-5 (+1e-5 relative).
  * GPU kernel: out 2e-2 (+2e-2 relative) and colsums 2e-2 (+2e-2 relative) for both dtypes,
    since WGMMA rounds f32 inputs to bf16 (documented in the kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention_scores import prefill_attention_with_scores_reference
from pallas_kernels import AllRows, LastRows, ProxyRows, _interpret, gpu, tpu

PROXY = "proxy"  # stands for ProxyRows of an int array, built per case
# (id, G, K, H, T, dtype, sliding_window, score_rows): GQA 1/3/4/8, H 64/128, odd lengths,
# ragged batches, all rows / last-W window / proxy rows (with ignored -1 and >= length).
CASES = [
    ("g1_h64_f32_all", 1, 2, 64, 45, jnp.float32, None, AllRows()),
    ("g3_h128_bf16_window", 3, 1, 128, 77, jnp.bfloat16, None, LastRows(8)),
    ("g4_h64_f32_proxy_sliding", 4, 1, 64, 130, jnp.float32, 33, PROXY),
    ("g8_h128_bf16_all_sliding", 8, 1, 128, 64, jnp.bfloat16, 20, AllRows()),
]


def make_case(g, n_kv, h, t, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (2, t, g * n_kv, h), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (2, t, n_kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (2, t, n_kv, h), jnp.float32).astype(dtype)
    lengths = jnp.array([t, t // 2 + 3], jnp.int32)
    return q, k, v, lengths


def proxy_rows(t):
    """[2, 5] rows; -1 and rows >= length (row 1 has length t // 2 + 3) are ignored, the
    row listed twice counts twice."""
    return ProxyRows(jnp.array([[t - 1, 0, 5, -1, t // 2],
                                [t // 2 + 2, t // 2 + 2, t - 1, 3, 1]], jnp.int32))


class PrefillChecks:
    """Checks shared by every backend; subclasses set `run` and tolerances."""

    INTERPRET = False
    OUT_ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
    COL_TOL = (5e-5, 1e-5)  # (atol, rtol)

    def run(self, *args, **kwargs):
        raise NotImplementedError

    def check(self, got, want, atol, rtol):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=atol, rtol=rtol)

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_reference(self, case):
        _, g, n_kv, h, t, dtype, window, rows = case
        q, k, v, lengths = make_case(g, n_kv, h, t, dtype)
        rows = proxy_rows(t) if isinstance(rows, str) else rows
        out, cols = self.run(q, k, v, lengths, sliding_window=window, score_rows=rows)
        ref_out, ref_cols = prefill_attention_with_scores_reference(
            q, k, v, lengths, sliding_window=window, score_rows=rows)
        assert out.shape == q.shape and out.dtype == dtype
        assert cols.shape == (2, g * n_kv, t) and cols.dtype == jnp.float32
        # rows past the length are padding: compare the valid ones
        for b, n_valid in enumerate(np.asarray(lengths)):
            atol = self.OUT_ATOL[dtype]
            self.check(out[b, :n_valid], ref_out[b, :n_valid], atol, 0 if atol < 1e-3 else atol)
        self.check(cols, ref_cols, *self.COL_TOL)

    def test_attention_only(self):
        q, k, v, lengths = make_case(4, 1, 64, 45, jnp.float32)
        out, cols = self.run(q, k, v, lengths, score_rows=None)
        assert cols is None
        ref, _ = prefill_attention_with_scores_reference(q, k, v, lengths)
        self.check(out[0], ref[0], self.OUT_ATOL[jnp.float32], 2e-2)

    def test_hand_computed(self):
        """T=2, N=K=1, H=16, q = k = 0: every row attends uniformly to keys 0..row.

        Row 0 sees key 0 (p = 1), row 1 sees keys 0 and 1 (p = 1/2 each); with v0 = e0,
        v1 = e1 the outputs are e0 and (e0 + e1) / 2. Column sums: all rows -> [1.5, 0.5];
        last row only (W = 1) -> [0.5, 0.5]; proxy row 0 -> [1, 0].
        """
        h = 16
        q = jnp.zeros((1, 2, 1, h), jnp.float32)
        v = jnp.eye(h)[:2][None, :, None, :]
        lengths = jnp.array([2])
        out, cols = self.run(q, q, v, lengths, score_rows=AllRows())
        self.check(out[0, :, 0, :2], [[1.0, 0.0], [0.5, 0.5]], 1e-6, 0)
        self.check(cols[0, 0], [1.5, 0.5], 1e-6, 0)
        _, cols = self.run(q, q, v, lengths, score_rows=LastRows(1))
        self.check(cols[0, 0], [0.5, 0.5], 1e-6, 0)
        _, cols = self.run(q, q, v, lengths, score_rows=ProxyRows(jnp.array([[0]])))
        self.check(cols[0, 0], [1.0, 0.0], 1e-6, 0)

    @pytest.mark.parametrize("bad", ["all", ("window", 8), np.zeros((2, 3), np.int32)],
                             ids=["str", "tuple", "array"])
    def test_rejects_untyped_score_rows(self, bad):
        q, k, v, lengths = make_case(1, 1, 64, 45, jnp.float32)
        with pytest.raises(ValueError, match="score_rows.*AllRows.*LastRows.*ProxyRows"):
            self.run(q, k, v, lengths, score_rows=bad)

    def test_rejects_proxy_rows_of_the_wrong_shape(self):
        q, k, v, lengths = make_case(1, 1, 64, 45, jnp.float32)
        with pytest.raises(ValueError, match="ProxyRows"):
            self.run(q, k, v, lengths, score_rows=ProxyRows(jnp.zeros((3,), jnp.int32)))


class TestPrefillTPU(PrefillChecks):
    """Mosaic TPU kernels, compiled (skips without a TPU)."""

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() != "tpu":
            pytest.skip("no TPU backend: covered by TestPrefillTPUInterpret")

    def run(self, *args, **kwargs):
        bs = tpu.PrefillBlockSizes(block_q=128, block_k=128, block_rows=128)
        return tpu.prefill_attention_with_scores(*args, block_sizes=bs,
                                                 interpret=self.INTERPRET, **kwargs)


class TestPrefillTPUInterpret(TestPrefillTPU):
    """The same checks in TPU interpret mode (pltpu.InterpretParams) on CPU."""

    INTERPRET = True


class TestPrefillGPU(PrefillChecks):
    """Mosaic GPU kernels, compiled (skips without a GPU)."""

    # the kernel feeds WGMMA bf16 operands; measured in interpret mode over CASES: outputs
    # within 0.012 (values up to 3), column sums within 0.0028 (sums up to 4.8): 2x margins
    OUT_ATOL = {jnp.float32: 2e-2, jnp.bfloat16: 2e-2}
    COL_TOL = (6e-3, 0)

    @pytest.fixture(autouse=True)
    def _backend(self):
        if self.INTERPRET and _interpret.GPU_INTERPRET_UNAVAILABLE:
            pytest.skip(_interpret.GPU_INTERPRET_UNAVAILABLE)
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("no GPU backend: covered by TestPrefillGPUInterpret")

    def run(self, *args, **kwargs):
        return gpu.prefill_attention_with_scores(*args, interpret=self.INTERPRET, **kwargs)


class TestPrefillGPUInterpret(TestPrefillGPU):
    """The same checks in the Mosaic GPU interpreter (InterpretGPUParams) on CPU."""

    INTERPRET = True
