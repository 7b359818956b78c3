"""Tests of models.gguf against independent references: gguf's quantizers, blocks packed by
hand from ggml's block layouts, llama.cpp's converter permutation and file layout, and
transformers models and GGUF loaders."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers, trainers

from models import gguf as mg

Q = gguf.GGMLQuantizationType
F16_EPS = 2.0**-11  # relative rounding error of float16 (half an ulp)


# ---- helpers: a trained BPE vocabulary, tiny transformers Llamas, a converter-like writer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Numbers: 1 22 333 4444 55555 and 3.14159, 2024-06-01.",
    "I'm sure they'll say we've done what you'd do.  Spaces   and\ttabs\n\n\nnewlines",
    "Café, naïve, Straße, 東京, Привет мир, 😀 emoji!",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi!<|im_end|>",
] * 4
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def bpe_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on CORPUS, specials at ids 0..2."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_fields(bpe_tokenizer) -> dict:
    """GGUF `tokenizer.*` metadata of the trained BPE, laid out as llama.cpp's converter does."""
    merges = json.loads(bpe_tokenizer.to_str())["model"]["merges"]
    tokens = [bpe_tokenizer.id_to_token(i) for i in range(bpe_tokenizer.get_vocab_size())]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def tiny_llama(vocab_size: int, *, tied: bool, seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM (float32) with a GQA 4:2 layout."""
    import torch
    import transformers

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    config = transformers.LlamaConfig(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms are initialised to ones; make them informative
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


def converter_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half -> interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


_LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_TO_GGUF[module]}.{suffix}"


def add_quantized(writer: gguf.GGUFWriter, name: str, data: np.ndarray,
                  qtype: gguf.GGMLQuantizationType) -> None:
    """Adds `data` ([rows, cols] float32) as `qtype`, 1-D tensors always as F32."""
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_llama_gguf(path: pathlib.Path, model, *, qtype=gguf.GGMLQuantizationType.F32,
                     tokenizer_fields: dict | None = None,
                     extra: Callable[[gguf.GGUFWriter], None] | None = None) -> pathlib.Path:
    """Writes `model` (transformers Llama) to `path` as convert_hf_to_gguf.py would."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    for key, value in (tokenizer_fields or {}).items():
        _add_field(writer, key, value)
    if extra is not None:
        extra(writer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().numpy().astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = converter_permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = converter_permute(data, n_head, n_kv)
        add_quantized(writer, gguf_name(hf_name), data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_field(writer: gguf.GGUFWriter, key: str, value) -> None:
    if key.endswith("_token_id"):
        writer.add_uint32(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)  # int -> INT32, float -> FLOAT32, str -> STRING
    else:
        writer.add_string(key, value)


def _blocks(x: np.ndarray, size: int = 32) -> np.ndarray:
    return x.reshape(-1, size)


def error_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Per-element worst-case |dequant(quant(x)) - x| implied by each format's definition."""
    b = _blocks(x).astype(np.float64)
    amax = np.abs(b).max(axis=1, keepdims=True)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    if qtype == Q.F32:
        bound = np.zeros_like(b)
    elif qtype == Q.F16:  # plus half the subnormal spacing 2^-24
        bound = np.abs(b) * F16_EPS + 2.0**-25
    elif qtype == Q.BF16:
        bound = np.abs(b) * 2.0**-8
    elif qtype == Q.Q8_0:  # d = amax / 127, round to nearest; d stored as f16
        bound = (0.5 + 127 * F16_EPS) * amax / 127
    elif qtype in (Q.Q4_0, Q.Q5_0):  # d = -signed_max / 2^(n-1); the top code clips by 1 step
        steps = 8 if qtype == Q.Q4_0 else 16
        bound = (1.0 + steps * F16_EPS) * amax / steps
    elif qtype in (Q.Q4_1, Q.Q5_1):  # d = (max - min) / (2^n - 1), offset min, both f16
        levels = 15 if qtype == Q.Q4_1 else 31
        bound = (0.5 + levels * F16_EPS) * (hi - lo) / levels + np.abs(lo) * F16_EPS
    else:
        raise AssertionError(qtype)
    return (np.broadcast_to(bound, b.shape) * 1.001 + 1e-12).reshape(x.shape)


def _write_tensors(path, tensors: dict) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read_back(path) -> dict[str, np.ndarray]:
    return {t.name: mg.dequantize_tensor(t) for t in mg.open_gguf(path).tensors}


ROUND_TRIP_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def test_dequantize_round_trip_within_format_error_bound(tmp_path):
    rng = np.random.default_rng(0)
    originals, tensors = {}, {}
    for i, qtype in enumerate(ROUND_TRIP_TYPES):
        x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 3.0, (6, 1)) + 0.3 * i)
        x = x.astype(np.float32)
        originals[qtype.name] = x
        data = x.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(x, qtype)
        tensors[qtype.name] = (data, None if qtype == Q.F16 else qtype)
    _write_tensors(tmp_path / "q.gguf", tensors)
    restored = _read_back(tmp_path / "q.gguf")
    for qtype in ROUND_TRIP_TYPES:
        x, y = originals[qtype.name], restored[qtype.name]
        assert y.dtype == np.float32 and y.shape == x.shape, qtype.name
        err = np.abs(y.astype(np.float64) - x)
        assert (err <= error_bound(x, qtype)).all(), (qtype.name, err.max())
        assert err.mean() < 0.5 * error_bound(x, qtype).mean() + 1e-9, qtype.name


def test_f32_is_exact_and_a_copy(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    _write_tensors(tmp_path / "f.gguf", {"w": (x, None)})
    reader = mg.open_gguf(tmp_path / "f.gguf")
    y = mg.dequantize_tensor(reader.tensors[0])
    np.testing.assert_array_equal(y, x)
    assert y.flags.writeable and not np.may_share_memory(y, reader.tensors[0].data)


def _f16_bytes(value: float) -> np.ndarray:
    return np.array([value], dtype="<f2").view(np.uint8)


def test_hand_computed_q8_0_and_q4_0_blocks(tmp_path):
    # Q8_0 block: f16 scale d, then 32 int8 codes; value = d * q.
    q8 = np.arange(-16, 16, dtype=np.int8)
    q8_block = np.concatenate([_f16_bytes(0.5), q8.view(np.uint8)])
    # Q4_0 block: f16 d, 16 bytes; byte j holds element j (low nibble) and j + 16 (high);
    # value = (nibble - 8) * d.
    low = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], dtype=np.uint8)
    high = low[::-1]
    q4_block = np.concatenate([_f16_bytes(0.25), low | (high << 4)])
    _write_tensors(tmp_path / "h.gguf", {"q8": (q8_block[None], Q.Q8_0),
                                         "q4": (q4_block[None], Q.Q4_0)})
    out = _read_back(tmp_path / "h.gguf")
    np.testing.assert_array_equal(out["q8"], [[0.5 * v for v in range(-16, 16)]])
    expected_q4 = [(v - 8) * 0.25 for v in range(16)] + [(v - 8) * 0.25 for v in range(15, -1, -1)]
    np.testing.assert_array_equal(out["q4"], [expected_q4])


# ---- k-quants: blocks of 256 values packed by hand from ggml-common.h's block layouts ----

def _pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """12 bytes holding eight 6-bit scales and mins (get_scale_min_k4's layout)."""
    out = np.zeros(12, dtype=np.uint8)
    out[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    out[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    out[8:12] = (sc[4:8] & 0xF) | ((mn[4:8] & 0xF) << 4)
    return out


def _q4_k_block(rng):
    d, dmin = 0.03125, 0.0078125
    sc, mn = rng.integers(0, 64, 8, dtype=np.uint8), rng.integers(0, 64, 8, dtype=np.uint8)
    q = rng.integers(0, 16, 256, dtype=np.uint8)
    qs = np.concatenate([q[64 * c:64 * c + 32] | (q[64 * c + 32:64 * c + 64] << 4)
                         for c in range(4)])
    sub = np.arange(256) // 32
    expected = d * sc[sub] * q.astype(np.float64) - dmin * mn[sub]
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(sc, mn), qs]), \
        expected


def _q5_k_block(rng):
    d, dmin = 0.015625, 0.0625
    sc, mn = rng.integers(0, 64, 8, dtype=np.uint8), rng.integers(0, 64, 8, dtype=np.uint8)
    q = rng.integers(0, 32, 256, dtype=np.uint8)
    lo = q & 0xF
    qs = np.concatenate([lo[64 * c:64 * c + 32] | (lo[64 * c + 32:64 * c + 64] << 4)
                         for c in range(4)])
    qh = np.zeros(32, dtype=np.uint8)
    for sub in range(8):  # sub-block s takes its fifth bit from bit s of qh[l]
        qh |= ((q[32 * sub:32 * sub + 32] >> 4) & 1) << sub
    s = np.arange(256) // 32
    expected = d * sc[s] * q.astype(np.float64) - dmin * mn[s]
    block = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(sc, mn), qh, qs])
    return block, expected


def _q6_k_block(rng):
    d = 0.0078125
    scales = rng.integers(-128, 128, 16).astype(np.int8)
    q = rng.integers(0, 64, 256, dtype=np.uint8)
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):  # each half of 128: four quadrants of 32 sharing ql/qh bytes
        base = q[128 * h:128 * h + 128].reshape(4, 32)
        ql[64 * h:64 * h + 32] = (base[0] & 0xF) | ((base[2] & 0xF) << 4)
        ql[64 * h + 32:64 * h + 64] = (base[1] & 0xF) | ((base[3] & 0xF) << 4)
        qh[32 * h:32 * h + 32] = sum((base[k] >> 4) << (2 * k) for k in range(4))
    idx = np.arange(256)
    scale_idx = 8 * (idx // 128) + (idx % 32) // 16 + 2 * ((idx % 128) // 32)
    expected = d * scales[scale_idx].astype(np.float64) * (q.astype(np.float64) - 32)
    return np.concatenate([ql, qh, scales.view(np.uint8), _f16_bytes(d)]), expected


def _q2_k_block(rng):
    d, dmin = 0.125, 0.03125
    sc = rng.integers(0, 16, 16, dtype=np.uint8)
    mn = rng.integers(0, 16, 16, dtype=np.uint8)
    q = rng.integers(0, 4, 256, dtype=np.uint8)
    idx = np.arange(256)
    n, j, sub, l_ = idx // 128, (idx % 128) // 32, (idx % 32) // 16, idx % 16
    qs = np.zeros(64, np.uint8)
    np.bitwise_or.at(qs, 32 * n + 16 * sub + l_, (q << (2 * j)).astype(np.uint8))
    s = 8 * n + 2 * j + sub
    expected = d * sc[s] * q.astype(np.float64) - dmin * mn[s]
    return np.concatenate([sc | (mn << 4), qs, _f16_bytes(d), _f16_bytes(dmin)]), expected


def _q3_k_block(rng):
    d = 0.0625
    s6 = rng.integers(0, 64, 16, dtype=np.uint8)  # stored scale = signed scale + 32
    q = rng.integers(0, 8, 256, dtype=np.uint8)  # 3-bit code; value = code - 4
    idx = np.arange(256)
    n, j, sub, l_ = idx // 128, (idx % 128) // 32, (idx % 32) // 16, idx % 16
    qs, hmask = np.zeros(64, np.uint8), np.zeros(32, np.uint8)
    np.bitwise_or.at(qs, 32 * n + 16 * sub + l_, ((q & 3) << (2 * j)).astype(np.uint8))
    np.bitwise_or.at(hmask, 16 * sub + l_, ((q >> 2) << (4 * n + j)).astype(np.uint8))
    packed = np.zeros(12, np.uint8)
    packed[0:4] = (s6[0:4] & 0xF) | ((s6[8:12] & 0xF) << 4)
    packed[4:8] = (s6[4:8] & 0xF) | ((s6[12:16] & 0xF) << 4)
    packed[8:12] = ((s6[0:4] >> 4) | ((s6[4:8] >> 4) << 2) | ((s6[8:12] >> 4) << 4)
                    | ((s6[12:16] >> 4) << 6))
    s = 8 * n + 2 * j + sub
    expected = d * (s6[s].astype(np.float64) - 32) * (q.astype(np.float64) - 4)
    return np.concatenate([hmask, qs, packed, _f16_bytes(d)]), expected


K_BLOCKS = {Q.Q2_K: _q2_k_block, Q.Q3_K: _q3_k_block, Q.Q4_K: _q4_k_block,
            Q.Q5_K: _q5_k_block, Q.Q6_K: _q6_k_block}


def test_k_quant_blocks_packed_by_hand(tmp_path):
    rng = np.random.default_rng(2)
    tensors, expected = {}, {}
    for qtype, make in K_BLOCKS.items():
        rows = [make(rng) for _ in range(3)]  # 3 rows of one 256-value block each
        tensors[qtype.name] = (np.stack([r[0] for r in rows]), qtype)
        expected[qtype.name] = np.stack([r[1] for r in rows])
        assert tensors[qtype.name][0].shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    _write_tensors(tmp_path / "k.gguf", tensors)
    out = _read_back(tmp_path / "k.gguf")
    for name, want in expected.items():
        assert out[name].shape == (3, 256), name
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_unsupported_tensor_type_is_named():
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*IQ2_XXS"):
        mg.check_tensor_type("blk.0.attn_q.weight", Q.IQ2_XXS)
    for qtype in mg.SUPPORTED_TENSOR_TYPES:
        mg.check_tensor_type("x", qtype)


# ---- q/k permutation ----

@pytest.mark.parametrize("n_head,n_kv,head_dim", [(4, 2, 16), (9, 3, 64), (8, 8, 8)])
def test_unpermute_inverts_converter_permutation(n_head, n_kv, head_dim):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, 24)).astype(np.float32)
    pq, pk = converter_permute(q, n_head, n_head), converter_permute(k, n_head, n_kv)
    assert not np.array_equal(pq, q) and not np.array_equal(pk, k)
    np.testing.assert_array_equal(mg.unpermute_qk(pq, n_head), q)
    np.testing.assert_array_equal(mg.unpermute_qk(pk, n_kv), k)
    np.testing.assert_array_equal(converter_permute(mg.unpermute_qk(q, n_head), n_head, n_head), q)
    bias = rng.standard_normal(n_kv * head_dim).astype(np.float32)
    permuted_bias = converter_permute(bias, n_head, n_kv)
    np.testing.assert_array_equal(mg.unpermute_qk(permuted_bias, n_kv), bias)


def test_permuted_rows_are_interleaved_rotary_pairs():
    """GGUF row 2i / 2i+1 of a head is Hugging Face row i / i + head_dim/2 (rotate-half)."""
    n_head, head_dim = 3, 8
    w = np.arange(n_head * head_dim, dtype=np.float32)[:, None]  # HF row r holds r
    gguf_rows = converter_permute(w, n_head, n_head)[:, 0]
    half = head_dim // 2
    for h in range(n_head):
        for i in range(half):
            assert gguf_rows[h * head_dim + 2 * i] == h * head_dim + i
            assert gguf_rows[h * head_dim + 2 * i + 1] == h * head_dim + half + i
    np.testing.assert_array_equal(mg.unpermute_qk(gguf_rows[:, None], n_head), w)
    with pytest.raises(ValueError, match="n_heads=5"):
        mg.unpermute_qk(w, 5)


# ---- end to end: transformers model -> GGUF (as llama.cpp writes it) -> load_gguf ----

E2E_CASES = [(False, Q.F32), (True, Q.F32), (True, Q.F16), (False, Q.BF16), (True, Q.Q8_0),
             (False, Q.Q4_0), (False, Q.Q5_1)]


@pytest.mark.parametrize("tied,qtype", E2E_CASES, ids=[f"{'tied' if t else 'untied'}-{q.name}"
                                                      for t, q in E2E_CASES])
def test_load_gguf_matches_transformers_model(tmp_path, bpe_fields, bpe_tokenizer, tied, qtype):
    vocab = len(bpe_fields["tokenizer.ggml.tokens"])
    model = tiny_llama(vocab, tied=tied, seed=int(qtype))
    path = write_llama_gguf(tmp_path / "m.gguf", model, qtype=qtype, tokenizer_fields=bpe_fields)
    ckpt = mg.load_gguf(path, progress=False)

    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    if tied:
        del hf["lm_head.weight"]
    assert set(ckpt.tensors) == set(hf)
    for name, want in hf.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if want.ndim == 1 or qtype == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            assert (np.abs(got.astype(np.float64) - want) <= error_bound(want, qtype)).all(), name

    cfg = model.config
    expected = {"model_type": "llama", "vocab_size": vocab, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": cfg.rms_norm_eps,
                "rope_theta": cfg.rope_parameters["rope_theta"], "rope_scaling": None,
                "max_position_embeddings": 512, "tie_word_embeddings": tied,
                "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2}
    assert {k: ckpt.hf_config[k] for k in expected} == expected
    text = "Hello <|im_start|>user 12345 naïve 東京\n\n  code()"
    assert ckpt.tokenizer.encode(text) == bpe_tokenizer.encode(text).ids


def test_loaded_tensors_reproduce_transformers_logits(tmp_path, bpe_fields):
    import torch
    import transformers

    vocab = len(bpe_fields["tokenizer.ggml.tokens"])
    model = tiny_llama(vocab, tied=False, seed=7)
    ckpt = mg.load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, tokenizer_fields=bpe_fields),
                        progress=False)
    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.hf_config)).eval()
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.tensors.items()})
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


# ---- rope scaling ----

def _llama3_inv_freq(theta, head_dim, scaling):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim, num_attention_heads=1,
                                      head_dim=head_dim, rope_theta=theta,
                                      max_position_embeddings=131072, rope_scaling=dict(scaling))
    return ROPE_INIT_FUNCTIONS["llama3"](config)[0].double().numpy()


def _rope_freqs_like_converter(theta, head_dim, scaling) -> np.ndarray:
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (base / _llama3_inv_freq(theta, head_dim, scaling)).astype(np.float32)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = {**LLAMA31, "factor": 32.0}


@pytest.mark.parametrize("head_dim,scaling", [(128, LLAMA31), (64, LLAMA32),
                                              (128, {**LLAMA31, "low_freq_factor": 2.0,
                                                     "high_freq_factor": 8.0})])
def test_llama3_rope_scaling_recovered_from_rope_freqs(head_dim, scaling):
    theta = 500000.0
    freqs = _rope_freqs_like_converter(theta, head_dim, scaling)
    recovered = mg.llama3_rope_scaling(freqs, theta=theta, head_dim=head_dim)
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == scaling["factor"]
    np.testing.assert_allclose(_llama3_inv_freq(theta, head_dim, recovered),
                               _llama3_inv_freq(theta, head_dim, scaling), rtol=1e-5)
    if scaling["low_freq_factor"] == 1.0:
        assert recovered == scaling


def test_llama3_rope_freqs_tensor_in_file(tmp_path, bpe_fields):
    vocab = len(bpe_fields["tokenizer.ggml.tokens"])
    model = tiny_llama(vocab, tied=True, hidden_size=128, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, rope_theta=500000.0)
    freqs = _rope_freqs_like_converter(500000.0, 64, LLAMA32)
    extra = lambda w: w.add_tensor("rope_freqs.weight", freqs)  # noqa: E731
    path = write_llama_gguf(tmp_path / "m.gguf", model, tokenizer_fields=bpe_fields, extra=extra)
    ckpt = mg.load_gguf(path, progress=False)
    assert ckpt.hf_config["rope_scaling"] == LLAMA32
    assert ckpt.hf_config["head_dim"] == 64
    assert not any("rope" in name for name in ckpt.tensors)


def test_rope_scaling_keys(tmp_path, bpe_fields):
    vocab = len(bpe_fields["tokenizer.ggml.tokens"])
    model = tiny_llama(vocab, tied=True)

    def linear(w):
        w.add_string("llama.rope.scaling.type", "linear")
        w.add_float32("llama.rope.scaling.factor", 4.0)

    path = write_llama_gguf(tmp_path / "lin.gguf", model, tokenizer_fields=bpe_fields, extra=linear)
    assert mg.load_gguf(path, progress=False).hf_config["rope_scaling"] == {
        "rope_type": "linear", "factor": 4.0}
    path = write_llama_gguf(tmp_path / "yarn.gguf", model, tokenizer_fields=bpe_fields,
                       extra=lambda w: w.add_string("llama.rope.scaling.type", "yarn"))
    with pytest.raises(ValueError, match="'yarn'"):
        mg.load_gguf(path, progress=False)
    with pytest.raises(ValueError, match="not a llama3 rope scaling|cannot infer"):
        mg.llama3_rope_scaling(np.linspace(1, 3, 64), theta=500000.0, head_dim=128)


# ---- bad input ----

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        mg.load_gguf(missing)


def test_truncated_and_corrupt_files(tmp_path, bpe_fields):
    model = tiny_llama(len(bpe_fields["tokenizer.ggml.tokens"]), tied=True)
    full = write_llama_gguf(tmp_path / "full.gguf", model, tokenizer_fields=bpe_fields).read_bytes()
    for n in (0, 3, 20, 200, len(full) // 2, len(full) - 1):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(full[:n])
        with pytest.raises(ValueError, match=f"cut{n}.gguf"):
            mg.load_gguf(cut, progress=False)
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGML" + full[4:])
    with pytest.raises(ValueError, match="magic.gguf"):
        mg.load_gguf(bad_magic, progress=False)


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        mg.load_gguf(path, progress=False)


def test_unsupported_tensor_type_in_file(tmp_path, bpe_fields):
    model = tiny_llama(len(bpe_fields["tokenizer.ggml.tokens"]), tied=True)
    extra = lambda w: w.add_tensor("blk.0.attn_q.bias", np.ones(64, np.int8))  # noqa: E731
    path = write_llama_gguf(tmp_path / "i8.gguf", model, tokenizer_fields=bpe_fields, extra=extra)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.bias' has type I8"):
        mg.load_gguf(path, progress=False)


def test_attention_bias_is_unpermuted_and_flagged(tmp_path, bpe_fields):
    model = tiny_llama(len(bpe_fields["tokenizer.ggml.tokens"]), tied=True)
    bias = np.random.default_rng(5).standard_normal(64).astype(np.float32)  # 4 heads x 16
    extra = lambda w: w.add_tensor("blk.1.attn_q.bias", converter_permute(bias, 4, 4))  # noqa
    path = write_llama_gguf(tmp_path / "b.gguf", model, tokenizer_fields=bpe_fields, extra=extra)
    ckpt = mg.load_gguf(path, progress=False)
    np.testing.assert_array_equal(ckpt.tensors["model.layers.1.self_attn.q_proj.bias"], bias)
    assert ckpt.hf_config["attention_bias"] is True and ckpt.hf_config["mlp_bias"] is False


def test_unknown_tensor_name(tmp_path, bpe_fields):
    model = tiny_llama(len(bpe_fields["tokenizer.ggml.tokens"]), tied=True)
    extra = lambda w: w.add_tensor("blk.0.ffn_gate_exps.weight", np.ones(8, np.float32))  # noqa
    path = write_llama_gguf(tmp_path / "moe.gguf", model, tokenizer_fields=bpe_fields, extra=extra)
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight'"):
        mg.load_gguf(path, progress=False)


def test_progress_bar_writes_to_stderr(tmp_path, bpe_fields, capsys):
    model = tiny_llama(len(bpe_fields["tokenizer.ggml.tokens"]), tied=True)
    path = write_llama_gguf(tmp_path / "p.gguf", model, tokenizer_fields=bpe_fields)
    mg.load_gguf(path, progress=True)
    assert "p.gguf" in capsys.readouterr().err
    mg.load_gguf(path, progress=False)
    assert capsys.readouterr().err == ""


def test_error_bound_helper_is_tight_enough():
    """Guards the bounds above against being vacuous: Q4_0's is 1/8 of the block's amax."""
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    assert math.isclose(error_bound(x, Q.Q4_0).max(), (1 + 8 * F16_EPS) / 8 * 1.001, rel_tol=1e-6)


# ---- SentencePiece vocabulary in a GGUF, against transformers' GGUF tokenizer ----

def _spm_fields(corpus: list[str]) -> dict:
    """A SentencePiece-style vocabulary: specials, 256 byte pieces, pieces by score."""
    trainer_tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420,
                                                                show_progress=False))
    model = json.loads(trainer_tok.to_str())["model"]
    merged = [(m if isinstance(m, str) else " ".join(m)).replace(" ", "")
              for m in model["merges"]]
    pieces = list(dict.fromkeys(merged))
    pieces += [t for t in model["vocab"] if len(t) == 1 and t not in pieces]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_gguf_matches_transformers(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fields = _spm_fields([t for t in CORPUS if "<|" not in t])
    model = tiny_llama(len(fields["tokenizer.ggml.tokens"]), tied=True)
    path = write_llama_gguf(tmp_path / "spm.gguf", model, tokenizer_fields=fields)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ours = mg.load_gguf(path, progress=False).tokenizer
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    texts = ["Hello world", " leading and trailing spaces ", "Numbers 1 22 333 and 3.14",
             "Tabs\tand\nnewlines\n\n  indented", "Café naïve 東京 😀",
             "def add(a, b):\n    return a + b\n", "unknown ☃ snowman", "<s>hi</s>"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False), text


# ---- the real SmolLM2-135M-Instruct Q4_1 file, against transformers' own GGUF loader ----

@pytest.fixture(scope="module")
def smollm2_path():
    from models.smollm2 import find_smollm2

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield find_smollm2()


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_path):
    return mg.load_gguf(smollm2_path, progress=False)


@pytest.mark.slow
def test_smollm2_config(smollm2_ckpt):
    cfg = smollm2_ckpt.hf_config
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64 and cfg["intermediate_size"] == 1536
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in smollm2_ckpt.tensors
    assert smollm2_ckpt.tokenizer.eos_id == 2


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_path, smollm2_ckpt, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype="float32")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(smollm2_ckpt.tensors) == set(state)
    for name, want in state.items():
        got = smollm2_ckpt.tensors[name]
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6, err_msg=name)
    hf_cfg = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "tie_word_embeddings"):
        assert smollm2_ckpt.hf_config[key] == getattr(hf_cfg, key), key
