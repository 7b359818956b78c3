"""ObservedAttention's column sums come from the fused score-emitting prefill kernel when a
Pallas attn_impl is used (interpret mode here), and equal the chunked jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.observation import ObsSpec
from pallas_kernels import _interpret

IMPLS = [pytest.param("pallas_tpu"),
         pytest.param("pallas_gpu", marks=pytest.mark.skipif(
             _interpret.GPU_INTERPRET_UNAVAILABLE is not None,
             reason=str(_interpret.GPU_INTERPRET_UNAVAILABLE)))]
TOL = {"pallas_tpu": 1e-5, "pallas_gpu": 2e-2}  # the GPU kernel feeds WGMMA bf16 inputs


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_layer_column_sums_from_kernel(impl):
    ks = jax.random.split(jax.random.key(0), 3)
    b, t, n, n_kv, h = 2, 48, 4, 2, 16
    q = jax.random.normal(ks[0], (b, t, n, h))
    k = jax.random.normal(ks[1], (b, t, n_kv, h))
    v = jax.random.normal(ks[2], (b, t, n_kv, h))
    lengths = jnp.array([48, 29])
    spec = ObsSpec(column_sums=True)
    def count(s, what):
        return str(jax.make_jaxpr(lambda *a: kvjax.prefill_layer(
            *a, lengths, tail_capacity=4, obs_spec=s, attn_impl=impl))(q, k, v)).count(what)

    kernel = "pallas_call" if impl == "pallas_tpu" else "mpmd_map"
    assert count(spec, kernel) == count(ObsSpec(), kernel) + 1  # the kernel's score pass
    assert count(spec, "scan") == count(ObsSpec(), "scan")  # no chunked jnp column sums
    out, _, obs = kvjax.prefill_layer(q, k, v, lengths, tail_capacity=4, obs_spec=spec,
                                      attn_impl=impl)
    ref_out, _, ref = kvjax.prefill_layer(q, k, v, lengths, tail_capacity=4, obs_spec=spec,
                                          attn_impl="reference")
    for row, n_valid in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(obs.column_sums)[row, :, :n_valid],
                                   np.asarray(ref.column_sums)[row, :, :n_valid],
                                   atol=TOL[impl] * 10, rtol=TOL[impl])
        np.testing.assert_allclose(np.asarray(out)[row, :n_valid],
                                   np.asarray(ref_out)[row, :n_valid], atol=TOL[impl])


def test_observed_attention_keeps_the_same_tokens_with_the_kernel():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=256)
    model = models.Decoder(cfg, rngs=nnx.Rngs(2))
    fn, params = model.kvjax_split()
    rng = np.random.RandomState(3)
    toks, lens = loops.pad_prompts([list(rng.randint(0, 97, n)) for n in (40, 23)])
    press = kvjax.ObservedAttentionPress(compression_ratio=0.5)
    caches = {impl: loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens),
                                  tail_capacity=4, press=press, attn_impl=impl)[1]
              for impl in ("reference", "pallas_tpu")}
    for a, b in zip(caches["reference"].layers, caches["pallas_tpu"].layers):
        np.testing.assert_array_equal(np.asarray(a.prefix.length), np.asarray(b.prefix.length))
        for row, n in enumerate(np.asarray(a.prefix.length)[:, 0]):
            np.testing.assert_array_equal(np.asarray(a.prefix.pos)[row, :, :n],
                                          np.asarray(b.prefix.pos)[row, :, :n])
