"""attn_impl dispatch: "auto" by backend, kernels reached through kvjax's integration API, and
generate with each kernel forced (interpret mode on CPU) giving the reference's tokens."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import dispatch
from kvjax.attention import resolve_attn_impl
from pallas_kernels import _interpret

# primitive that each kernel leaves in a jaxpr (plgpu.kernel lowers through mpmd_map)
KERNEL_PRIMITIVE = {"pallas_tpu": "pallas_call", "pallas_gpu": "mpmd_map"}
IMPLS = [pytest.param("pallas_tpu"),
         pytest.param("pallas_gpu", marks=pytest.mark.skipif(
             _interpret.GPU_INTERPRET_UNAVAILABLE is not None,
             reason=str(_interpret.GPU_INTERPRET_UNAVAILABLE)))]
PRESSES = {"dense": None, "snapkv": kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)}


def test_auto_follows_the_default_backend():
    want = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")
    assert resolve_attn_impl("auto") == want
    assert resolve_attn_impl("pallas_tpu") == "pallas_tpu"
    with pytest.raises(ValueError, match="attn_impl"):
        resolve_attn_impl("triton")


def _primitives(fn, *args) -> set[str]:
    return set(re.findall(r"\b(pallas_call|mpmd_map)\b", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_api_reaches_the_kernels(impl):
    """prefill_layer and one-token decode_layer use the kernel; multi-token extend does not."""
    b, t, n, n_kv, h = 2, 16, 4, 2, 16
    x = jnp.ones((b, t, n, h))
    kv = jnp.ones((b, t, n_kv, h))
    lengths = jnp.array([16, 9])

    def prefill(q, k):
        return kvjax.prefill_layer(q, k, k, lengths, tail_capacity=4, attn_impl=impl)[0]

    assert _primitives(prefill, x, kv) == {KERNEL_PRIMITIVE[impl]}
    _, layer, _ = kvjax.prefill_layer(x, kv, kv, lengths, tail_capacity=4)

    def decode(q, k, steps):
        pos = kvjax.decode_positions(jnp.array([16, 9]), steps)
        return kvjax.decode_layer(q, k, k, pos, jnp.full((b,), steps), layer, attn_impl=impl)[0]
    assert _primitives(lambda q, k: decode(q, k, 1), x[:, :1], kv[:, :1]) == {
        KERNEL_PRIMITIVE[impl]}
    assert _primitives(lambda q, k: decode(q, k, 2), x[:, :2], kv[:, :2]) == set()
    assert _primitives(
        lambda q, k: kvjax.prefill_layer(q, k, k, lengths, tail_capacity=4,
                                         attn_impl="reference")[0], x, kv) == set()


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_adapts_thin_layer_cache(impl):
    """LayerCache with thin keys and values (ThinK) -> kernel arguments: same as the reference."""
    ks = jax.random.split(jax.random.key(3), 8)
    b, n_kv, g, h, c, s, dk, hv = 2, 2, 2, 32, 24, 8, 16, 16
    chans = jnp.broadcast_to(jnp.arange(0, h, 2, dtype=jnp.int32), (b, n_kv, dk))
    vchans = jnp.broadcast_to(jnp.arange(1, h, 2, dtype=jnp.int32), (b, n_kv, hv))
    prefix = kvjax.Prefix(jax.random.normal(ks[0], (b, n_kv, c, dk)),
                          jax.random.normal(ks[1], (b, n_kv, c, hv)),
                          jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, n_kv, c)),
                          jnp.array([[c, 5], [0, 17]], jnp.int32), chans, vchans)
    tail = kvjax.Tail(jax.random.normal(ks[2], (b, n_kv, s, h)),
                      jax.random.normal(ks[3], (b, n_kv, s, h)),
                      c + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
                      jnp.array([3, 1], jnp.int32))
    layer = kvjax.LayerCache(prefix, tail)
    q = jax.random.normal(ks[4], (b, 1, n_kv * g, h))
    q_pos = (c + tail.count - 1)[:, None]
    out = dispatch.decode_attention(q, q_pos, layer, attn_impl=impl)
    ref = dispatch.decode_attention(q, q_pos, layer, attn_impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref),
                               atol=2e-2 if impl == "pallas_gpu" else 1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=256)
    return models.Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(1)
    return [list(rng.randint(0, 97, n)) for n in (17, 9, 30)]


@pytest.fixture(scope="module")
def reference_tokens(tiny, prompts):
    return {name: kvjax.generate(tiny, prompts, max_new_tokens=4, press=press,
                                 attn_impl="reference").tokens
            for name, press in PRESSES.items()}


@pytest.mark.parametrize("press_name", list(PRESSES))
@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_kernel_matches_reference(tiny, prompts, reference_tokens, impl,
                                                press_name):
    """Greedy tokens with the kernel forced (interpret mode off its backend) == reference."""
    out = kvjax.generate(tiny, prompts, max_new_tokens=4, press=PRESSES[press_name],
                         attn_impl=impl)
    np.testing.assert_array_equal(out.tokens, reference_tokens[press_name])
