"""Fixtures for the GGUF and tokenizer tests: a tiny trained BPE vocabulary, tiny random
Llama models, and a GGUF writer that lays files out the way llama.cpp's converter does."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers, trainers

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


@pytest.fixture(scope="session")
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


def gguf_tokenizer_fields(tok: tokenizers.Tokenizer, pre: str = "gpt2") -> dict:
    """`tokenizer.*` GGUF metadata describing the trained BPE, as the converter writes it."""
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


@pytest.fixture(scope="session")
def bpe_fields(bpe_tokenizer) -> dict:
    return gguf_tokenizer_fields(bpe_tokenizer)


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
                     tokenizer_fields: dict | None = None, arch: str = "llama",
                     extra: Callable[[gguf.GGUFWriter], None] | None = None) -> pathlib.Path:
    """Writes `model` (transformers Llama) to `path` as convert_hf_to_gguf.py would."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
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


@pytest.fixture(scope="session")
def gguf_writer() -> Callable[..., pathlib.Path]:
    """`write_llama_gguf(path, model, *, qtype, tokenizer_fields, arch, extra)`."""
    return write_llama_gguf


@pytest.fixture(scope="session")
def make_llama() -> Callable:
    """`tiny_llama(vocab_size, *, tied, seed=0, **config_overrides)`."""
    return tiny_llama


@pytest.fixture(scope="session")
def forward_permute() -> Callable[[np.ndarray, int, int | None], np.ndarray]:
    """llama.cpp's converter q/k permutation `permute(weights, n_head, n_head_kv)`."""
    return converter_permute


@pytest.fixture(scope="session")
def tokenizer_fields_for() -> Callable[..., dict]:
    """`gguf_tokenizer_fields(trained_tokenizer, pre="gpt2")`."""
    return gguf_tokenizer_fields
