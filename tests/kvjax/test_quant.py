"""Quantized store (`kvjax.quant`): int8 / float8_e4m3fn keys and values with f32 scales.

References: numpy round trips with the scales' error bounds, attention over the dequantized
arrays (`kvjax.cache.dequantize_store` + `cached_attention_reference`), the unquantized
pipeline on the same prompt, and hand-computed byte counts.
"""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_prompts, tiny_decoder
from jax import export

import kvjax
import models
from kvjax import loops
from kvjax.attention import cached_attention_reference
from kvjax.cache import dequantize_store, layer_view, quantize_store, write_view
from kvjax.memory import memory_report
from kvjax.presses import PRESSES, make_press
from kvjax.quant import KiviScales, KVQuant, TokenScales, check_backend, resolve_kv_quant
from kvjax.store_attention import store_attention
from pallas_kernels import gpu, tpu

_spec = importlib.util.spec_from_file_location(
    "store_cases", Path(__file__).parents[1] / "pallas_kernels" / "test_store_decode.py")
store_cases = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("store_cases", store_cases)
_spec.loader.exec_module(store_cases)

SCHEMES = [KVQuant("int8", TokenScales()), KVQuant("int8", KiviScales(group=8)),
           KVQuant("float8_e4m3fn", TokenScales()),
           KVQuant("float8_e4m3fn", KiviScales(group=16))]
IDS = ["int8_token", "int8_kivi", "fp8_token", "fp8_kivi"]


def f32_case(case_id="rowsK_g1_h64_f32_odd_store", p=304):
    """A random f32 store (test_store_decode's layouts) with P a multiple of every group."""
    case = next(c for c in store_cases.CASES if c[0] == case_id)
    case = case[:7] + (p,) + case[8:]
    return store_cases.make_case(case)


def numpy_roundtrip_bound(x: np.ndarray, scale: np.ndarray, quant: KVQuant) -> np.ndarray:
    """Largest |x - dequantize(quantize(x))| each element may have, from its scale."""
    if quant.dtype == "int8":
        return scale / 2 + 1e-7
    # e4m3: 3 mantissa bits (relative step 2^-3, half of it on rounding); subnormals 2^-9
    return np.abs(x) * 2.0 ** -4 + scale * 2.0 ** -10 + 1e-7


@pytest.mark.parametrize("quant", SCHEMES, ids=IDS)
def test_roundtrip_error_within_the_scale_bound(quant):
    """Every entry's error is within its scale's rounding bound; scales are absmax / qmax
    computed in numpy (per entry, or per channel over `group` slots for KIVI keys)."""
    store = f32_case()[0]
    qs = quantize_store(store, quant)
    assert qs.k.dtype == quant.storage_dtype and qs.v.dtype == quant.storage_dtype
    k, v = np.asarray(store.k), np.asarray(store.v)
    b, r, p, d = k.shape
    if quant.scheme == TokenScales():
        ks = np.abs(k).max(-1, keepdims=True) / quant.qmax
    else:
        g = quant.scheme.group
        ks = np.repeat(np.abs(k.reshape(b, r, p // g, g, d)).max(3) / quant.qmax, g, axis=2)
    vs = np.abs(v).max(-1, keepdims=True) / quant.qmax
    back = dequantize_store(qs)
    for x, s, y in ((k, ks, back.k), (v, vs, back.v)):
        s = np.broadcast_to(s, x.shape)
        err = np.abs(np.asarray(y) - x)
        assert np.all(err <= numpy_roundtrip_bound(x, s, quant)), err.max()
    k_scale = np.asarray(qs.k_scale)
    want = ks[..., 0] if quant.scheme == TokenScales() else ks[:, :, ::quant.scheme.group]
    np.testing.assert_allclose(k_scale, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qs.v_scale), vs[..., 0], rtol=1e-6)


@pytest.mark.parametrize("quant", SCHEMES, ids=IDS)
def test_quantized_attention_equals_attention_over_dequantized(quant):
    """`layer_view` and the decode path (`store_attention`, block by block) over the
    quantized store equal the spec over the dequantized float store (1e-6)."""
    store, q, q_pos, tail = f32_case()
    qs = quantize_store(store, quant)
    deq = dequantize_store(qs)
    for layer in range(store.n_layers):
        got, want = layer_view(qs, layer), layer_view(deq, layer)
        np.testing.assert_allclose(np.asarray(got.k), np.asarray(want.k), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got.v), np.asarray(want.v), atol=1e-6)
        ref = cached_attention_reference(q[:, None], q_pos[:, None], want, tail.layer(layer))
        out = store_attention(q[:, None], q_pos[:, None], qs, layer, tail.layer(layer), block=8)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("case_id", ["rowsK_g1_h64_f32_odd_store", "rowsKhalf_g8_h128_f32_thinKV",
                                     "rows1_g4_h64_bf16_window"])
def test_tpu_kernel_reads_the_quantized_store(case_id, dtype):
    """The Mosaic TPU kernel (interpret mode) over int8/fp8 entries with per-entry scales
    equals the reference over the dequantized store, in place (`prefix_offset`)."""
    case = next(c for c in store_cases.CASES if c[0] == case_id)
    store, q, q_pos, tail = store_cases.make_case(case)
    qs = quantize_store(store, KVQuant(dtype, TokenScales()))
    deq = dequantize_store(qs, store.k.dtype)
    window = case[11]
    atol = 1e-5 if q.dtype == jnp.float32 else 2e-2
    for layer in range(store.n_layers):
        ref = store_cases.reference(q, q_pos, layer_view(deq, layer), tail.layer(layer),
                                    sliding_window=window)
        args, kw = store_cases.store_args(q, q_pos, qs, layer, tail.layer(layer))
        out = tpu.decode_attention(*args, **kw, prefix_k_scale=qs.k_scale,
                                   prefix_v_scale=qs.v_scale, sliding_window=window,
                                   block_sizes=tpu.DecodeBlockSizes(128, 128), interpret=True)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=atol, rtol=0 if atol < 1e-3 else atol)


def test_kernels_reject_bad_scales():
    store, q, q_pos, tail = f32_case()
    qs = quantize_store(store, KVQuant("int8", TokenScales()))
    args, kw = store_cases.store_args(q, q_pos, qs, 0, tail.layer(0))
    with pytest.raises(ValueError, match="needs prefix_k_scale"):
        tpu.decode_attention(*args, **kw, interpret=True)
    with pytest.raises(ValueError, match="prefix_k_scale.shape"):
        tpu.decode_attention(*args, **kw, prefix_k_scale=qs.k_scale[:, :, :8],
                             prefix_v_scale=qs.v_scale, interpret=True)
    fargs, fkw = store_cases.store_args(q, q_pos, store, 0, tail.layer(0))
    with pytest.raises(ValueError, match="only for int8"):
        tpu.decode_attention(*fargs, **fkw, prefix_k_scale=qs.k_scale,
                             prefix_v_scale=qs.v_scale, interpret=True)
    with pytest.raises(ValueError, match="GPU kernel does not read a quantized store"):
        gpu.decode_attention(*args, **kw, interpret=True)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_tpu_kernel_with_scales_lowers(dtype):
    """Compiled lowering for a real TPU (jax.export on CPU) of a Llama-3-8B layer reading
    an int8/fp8 store with per-entry scales."""
    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    b, n, n_kv, h, s, p = 1, 32, 8, 128, 256, 8 * 4096
    st, bf = jnp.dtype(dtype), jnp.bfloat16
    args = (sd((b, n, h), bf), sd((b, 1, p, h), st), sd((b, 1, p, h), st), sd((b, n_kv), i32),
            sd((b, 1, p), i32), sd((b, n_kv, s, h), bf), sd((b, n_kv, s, h), bf),
            sd((b, s), i32), sd((b,), i32), sd((b,), i32), sd((b, n_kv), i32),
            sd((b, 1, p), jnp.float32), sd((b, 1, p), jnp.float32))

    def f(*a):
        return tpu.decode_attention(*a[:10], prefix_offset=a[10], max_prefix_len=4096,
                                    prefix_k_scale=a[11], prefix_v_scale=a[12], interpret=False)

    exported = export.export(jax.jit(f), platforms=("tpu",))(*args)
    assert exported.out_avals[0].shape == (b, n, h)


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder(head_dim=32)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((40, 23, 57), seed=3)


def press_instances():
    """Every registered press with its example arguments at ratio 0.5."""
    return {name: make_press(name, 0.5, **PRESSES[name][1]) for name in PRESSES}


def decode_logits(fn, params, state):
    state = jax.tree_util.tree_map(jnp.copy, state)  # decode_step donates its state
    state = loops.decode_step(fn, params, state, loops.eos_array(None), sampler=kvjax.Greedy(),
                              attn_impl="reference")
    return np.asarray(state.logits)


def test_every_registered_press_runs_with_int8(tiny, prompts):
    """Each press in jit with kv_dtype="int8": the store holds int8 with scales, and the first
    decode step over it equals the same step over its dequantized float copy (1e-5). (How
    far int8 moves the output from the unquantized run is measured by
    benchmarks/quant_store.py; the rounding bounds are tested above.)"""
    fn, params = tiny.kvjax_split()
    for name, press in press_instances().items():
        s1, _ = loops.start(fn, params, prompts, max_new_tokens=4, press=press, kv_dtype="int8")
        store = s1.cache.store
        assert store.k.dtype == jnp.int8 and store.v.dtype == jnp.int8, name
        assert store.k_scale is not None and store.v_scale is not None, name
        deq = dataclasses.replace(s1, cache=dataclasses.replace(
            s1.cache, store=dequantize_store(store)))
        np.testing.assert_allclose(decode_logits(fn, params, s1), decode_logits(fn, params, deq),
                                   atol=1e-5, err_msg=name)


def test_kv_dtype_compiles_prefill_once(tiny, prompts):
    """Two generate calls with kv_dtype="int8" (different prompts, same bucket) compile the
    prefill once; switching the dtype adds exactly one entry."""
    kvjax.generate(tiny, prompts, max_new_tokens=3, kv_dtype="int8")
    before = loops.prefill._cache_size()
    kvjax.generate(tiny, [p[::-1] for p in prompts], max_new_tokens=3, kv_dtype="int8")
    assert loops.prefill._cache_size() == before
    kvjax.generate(tiny, prompts, max_new_tokens=3, kv_dtype="float8_e4m3fn")
    assert loops.prefill._cache_size() == before + 1


def test_decoding_press_merges_into_a_quantized_store(tiny, prompts):
    """A DecodingPress merge (`after_step`) over an int8 store gives an int8 store whose
    entries equal the same merge over the dequantized float store, up to int8 rounding, with
    the same kept positions."""
    fn, params = tiny.kvjax_split()
    dp = kvjax.DecodingPress(press=kvjax.KnormPress(compression_ratio=0.5),
                             compression_interval=4)
    state, _ = loops.start(fn, params, prompts, max_new_tokens=8, decoding_press=dp,
                           kv_dtype="int8")
    for _ in range(3):  # three tokens in the tail (the loop merges at four)
        state = loops.decode_step(fn, params, state, loops.eos_array(None),
                                  sampler=kvjax.Greedy(), attn_impl="reference")
    cache = state.cache
    assert int(cache.tail.count.max()) > 0
    float_cache = dataclasses.replace(cache, store=dequantize_store(cache.store))
    merged_q, merged_f = dp.merge(cache), dp.merge(float_cache)
    assert merged_q.store.k.dtype == jnp.int8 and merged_f.store.k.dtype == jnp.float32
    got = dequantize_store(merged_q.store)
    np.testing.assert_array_equal(np.asarray(merged_q.store.length),
                                  np.asarray(merged_f.store.length))
    for layer in range(got.n_layers):
        a, b = layer_view(got, layer), layer_view(merged_f.store, layer)
        ok = np.arange(a.capacity) < np.asarray(a.length)[..., None]
        np.testing.assert_array_equal(np.asarray(a.pos) * ok, np.asarray(b.pos) * ok)
        for x, y in ((a.k, b.k), (a.v, b.v)):
            x, y = np.asarray(x) * ok[..., None], np.asarray(y) * ok[..., None]
            bound = np.abs(y).max(-1, keepdims=True) / 127 / 2 + 1e-6
            assert np.all(np.abs(x - y) <= bound), layer


def test_memory_report_counts_the_scales(tiny, prompts):
    """Held bytes = int8 entries + f32 scales, hand-computed from the store's shapes; the
    prefix needs (kept entries) x (Dk + Dv + 8 scale bytes) for the token scheme."""
    press = kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)
    cache = kvjax.generate(tiny, prompts, max_new_tokens=2, press=press, kv_dtype="int8").cache
    st = cache.store
    b, r, p, dk = st.k.shape
    dv = st.v.shape[-1]
    rep = memory_report(cache)
    assert rep.prefix_kv_bytes_held == b * r * p * (dk + dv) + 2 * b * r * p * 4
    n_kept = int(np.asarray(st.length).sum())
    assert rep.prefix_kv_bytes_needed == n_kept * (dk + dv + 8)
    f32 = memory_report(kvjax.generate(tiny, prompts, max_new_tokens=2, press=press).cache)
    assert rep.prefix_kv_bytes_needed / f32.prefix_kv_bytes_needed == pytest.approx(
        (dk + dv + 8) / (4 * (dk + dv)))


def test_kivi_store_slots_are_whole_groups(tiny, prompts):
    press = kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)
    quant = KVQuant("int8", KiviScales(group=32))
    st = kvjax.generate(tiny, prompts, max_new_tokens=2, press=press, kv_dtype=quant).cache.store
    assert st.slots % 32 == 0 and st.k_scale.shape == st.k.shape[:2] + (st.slots // 32,
                                                                        st.k.shape[3])


def test_bad_kv_dtype_errors():
    with pytest.raises(ValueError, match="kv_dtype='int4' is not supported"):
        resolve_kv_quant("int4")
    with pytest.raises(ValueError, match="scheme='kivi'.*KiviScales"):  # a name, not a scheme
        KVQuant("int8", "kivi")
    with pytest.raises(ValueError, match="group=12"):
        KiviScales(group=12)
    with pytest.raises(ValueError, match="scheme='kivi2'"):
        KVQuant.from_dict({"dtype": "int8", "scheme": "kivi2"})
    for quant in SCHEMES:  # the saved-context form round-trips
        assert KVQuant.from_dict(quant.to_dict()) == quant
    with pytest.raises(ValueError, match="kv_dtype=3"):
        resolve_kv_quant(3)
    assert resolve_kv_quant(None) is None and resolve_kv_quant("float32") is None


def test_fp8_on_a_backend_without_it_is_a_clear_error():
    """`check_backend` reports the probe's failure with the dtype and backend named."""
    def no_fp8(dtype, backend):
        return "Unsupported type float8_e4m3fn" if dtype != "int8" else ""

    with pytest.raises(ValueError, match=r"kv_dtype='float8_e4m3fn' is not available on the "
                                         r"'tpu' backend: Unsupported"):
        check_backend("float8_e4m3fn", "tpu", probe=no_fp8)
    check_backend("int8", "tpu", probe=no_fp8)
    check_backend("float8_e4m3fn", jax.default_backend())  # CPU converts fp8 exactly


def test_scale_bytes_fraction_is_small():
    """Token scheme: 8 scale bytes per entry; at head dim 64 that is 1/16 of the int8 bytes."""
    quant = KVQuant("int8", TokenScales())
    store = f32_case()[0]
    qs = quantize_store(store, quant)
    d = store.k.shape[-1]
    assert (qs.k_scale.nbytes + qs.v_scale.nbytes) / (qs.k.nbytes + qs.v.nbytes) == \
        pytest.approx(8 / (2 * d))
    assert math.isclose(quant.qmax, 127.0)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_pipeline_compress_once_with_a_quantized_store(tmp_path, tmp_path_factory, kv_dtype):
    """Pipeline(kv_dtype=...): `ask` over a quantized compressed context gives `run`'s tokens,
    and the context survives save/load with its dtype, scales and scheme."""
    from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama

    _, path = tiny_llama(tmp_path_factory.mktemp("q"), chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    pipe = kvjax.Pipeline(model, tok, kv_dtype=kv_dtype)
    context = "The lighthouse keeper wrote the code 4417 on the wall of the lamp room. " * 3
    press = make_press("snapkv", 0.5, **PRESSES["snapkv"][1])
    ctx = pipe.compress(context, press=press)
    assert str(ctx.cache.store.k.dtype) == kv_dtype
    want = pipe.run(context, "What code?", press=press, max_new_tokens=5).tokens
    assert pipe.ask(ctx, "What code?", max_new_tokens=5).tokens == want
    loaded = kvjax.CompressedContext.load(ctx.save(tmp_path / "c"), model)
    assert loaded.cache.store.quant == ctx.cache.store.quant
    for name in ("k", "v", "k_scale", "v_scale"):
        a, b = getattr(loaded.cache.store, name), getattr(ctx.cache.store, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert pipe.ask(loaded, "What code?", max_new_tokens=5).tokens == want


@pytest.mark.parametrize("quant", SCHEMES[:2], ids=IDS[:2])
def test_write_view_quantizes_only_what_it_writes(quant):
    """`write_view` over a quantized store equals quantizing the float store written with
    the same view (per-entry: the written entries' new scales; KIVI: whole-store requant)."""
    store = f32_case()[0]
    qs = quantize_store(store, quant)
    view = layer_view(dequantize_store(qs), 1)
    view = dataclasses.replace(view, k=view.k * 1.5 + 0.25, v=-view.v)  # new entries
    got = dequantize_store(write_view(qs, 1, view))
    want = dequantize_store(quantize_store(write_view(dequantize_store(qs), 1, view), quant))
    np.testing.assert_allclose(np.asarray(got.k), np.asarray(want.k), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.v), np.asarray(want.v), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(want.pos))
