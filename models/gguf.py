"""Loads Llama-architecture GGUF checkpoints (llama.cpp's format) as Hugging Face tensors.

`load_gguf` dequantizes every tensor to float32 with the `gguf` package, renames it to the
Hugging Face Llama layout, undoes the rotary row permutation llama.cpp's converter applies to
the query/key projections, and translates the metadata into a `config.json`-style dict.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tqdm.auto import tqdm

from models.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_TENSOR_TYPES = frozenset(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF checkpoint in Hugging Face form.

    Attributes:
        hf_config: Hugging Face `config.json`-style dict of a `LlamaForCausalLM`.
        tensors: Hugging Face parameter name -> float32 array in Hugging Face layout
            (`model.embed_tokens.weight` [V, D], projections [out, in], norms [D]).
        tokenizer: the tokenizer described by the metadata, or None if the file has none.
        metadata: every GGUF key -> Python value.
    """

    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray] = dataclasses.field(repr=False)
    tokenizer: Tokenizer | None = dataclasses.field(repr=False)
    metadata: dict[str, Any] = dataclasses.field(repr=False)


def load_gguf(path: str | pathlib.Path, *, progress: bool = True,
              lazy: bool = False) -> GGUFCheckpoint:
    """Reads a Llama/Mistral GGUF file into float32 Hugging Face tensors and config.

    Args:
        lazy: keep the file memory-mapped and dequantize a tensor only when it is read
            (`tensors` is then a `GGUFTensors` mapping): what `models.load` uses, so the host
            never holds every tensor in float32 at once.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is truncated or corrupt, or holds an unsupported architecture,
            tensor type, tensor name, shape or rope scaling.
    """
    path = pathlib.Path(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader.fields)
    check_architecture(metadata)
    by_name = {t.name: t for t in reader.tensors}
    for t in by_name.values():
        check_tensor_type(t.name, t.tensor_type)
    rope_freqs = by_name.pop("rope_freqs.weight", None)
    embed = by_name.get("token_embd.weight")
    config = hf_config_from_metadata(
        metadata, tensor_names=list(by_name),
        vocab_rows=None if embed is None else int(embed.shape[-1]),
        rope_freqs=None if rope_freqs is None else dequantize_tensor(rope_freqs))
    tensors = GGUFTensors(by_name, config)
    check_shapes({name: tensors.shape(name) for name in tensors}, config)
    if not lazy:
        bar = tqdm(tensors, desc=f"Loading {path.name}", unit="tensor", disable=not progress)
        tensors = {name: tensors.read(name) for name in bar}
    tokenizer = None
    if "tokenizer.ggml.tokens" in metadata:
        tokenizer = Tokenizer.from_gguf_fields(metadata)
    return GGUFCheckpoint(config, tensors, tokenizer, metadata)


class GGUFTensors(Mapping):
    """Hugging Face name -> float32 array, dequantized from the memory-mapped file when read.

    Also a `models.sources` tensor source: `shape(name)` without reading, `read(name)`.
    """

    def __init__(self, by_name: Mapping[str, ReaderTensor], config: Mapping[str, Any]):
        self._tensors = {hf_tensor_name(t.name): t for t in by_name.values()}
        self._config = config

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of tensor `name` (GGUF blocks are dequantized whole, then sliced)."""
        return convert_tensor(self._tensors[name], self._config)[1][rows]


def open_gguf(path: pathlib.Path) -> GGUFReader:
    """Opens `path` with the gguf reader, turning its failures into errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises many kinds on malformed input
        raise ValueError(f"{str(path)!r} is not a valid GGUF file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{str(path)!r} is truncated: tensor {t.name!r} ends at byte "
                             f"{t.data_offset + t.n_bytes} but the file has {size} bytes")
    return reader


def read_metadata(fields: Mapping[str, ReaderField]) -> dict[str, Any]:
    """GGUF key -> Python value (str, int, float, bool, or a list of those)."""
    return {name: _field_value(name, field) for name, field in fields.items()
            if field.types and not name.startswith("GGUF.")}


def _field_value(name: str, field: ReaderField) -> Any:
    if field.types[-1] == GGUFValueType.STRING:
        try:
            values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        except UnicodeDecodeError as err:
            raise ValueError(f"GGUF key {name!r} holds a string that is not UTF-8") from err
    else:
        values = [v for i in field.data for v in field.parts[i].tolist()]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def check_architecture(metadata: Mapping[str, Any]) -> str:
    """Returns `general.architecture`, raising unless it is a Llama-style architecture."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"general.architecture={arch!r} is not supported; "
                         f"supported: {SUPPORTED_ARCHITECTURES}")
    return arch


def check_tensor_type(name: str, qtype: GGMLQuantizationType) -> None:
    """Raises unless tensor `name`'s GGML type `qtype` can be dequantized."""
    if qtype not in SUPPORTED_TENSOR_TYPES:
        supported = sorted(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise ValueError(f"tensor {name!r} has type {getattr(qtype, 'name', qtype)}, which is "
                         f"not supported; supported: {supported}")


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:
    """float32 copy of `tensor` in numpy order (GGML dims reversed: [rows, cols])."""
    check_tensor_type(tensor.name, tensor.tensor_type)
    out = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if np.may_share_memory(out, tensor.data):
        out = out.copy()
    return out.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverts the q/k row permutation of llama.cpp's converter.

    The converter interleaves each head's rotary halves so rotary pairs are adjacent: GGUF
    row 2 * i + j of a head is Hugging Face row j * head_dim / 2 + i (j in {0, 1}). This
    restores Hugging Face's rotate-half row order.

    Args:
        weight: [n_heads * head_dim, ...] rows as stored in the GGUF file.
        n_heads: number of heads the rows belong to (KV heads for k_proj).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows=} is not divisible into {n_heads=} heads of even size")
    split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(name: str) -> str:
    """Hugging Face parameter name of GGUF tensor `name`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"tensor {name!r} is not part of a Llama checkpoint")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def convert_tensor(tensor: ReaderTensor, config: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    """(Hugging Face name, float32 array in Hugging Face layout) of one GGUF tensor."""
    name = hf_tensor_name(tensor.name)
    array = dequantize_tensor(tensor)
    if ".self_attn.q_proj." in name:
        array = unpermute_qk(array, config["num_attention_heads"])
    elif ".self_attn.k_proj." in name:
        array = unpermute_qk(array, config["num_key_value_heads"])
    return name, array


def expected_shapes(config: Mapping[str, Any], names: Iterable[str]) -> dict[str, tuple]:
    """Hugging Face shape of every parameter a Llama model with `config` has (+ `names` biases)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = (config["head_dim"] * config[k] for k in ("num_attention_heads", "num_key_value_heads"))
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                 "mlp.down_proj.weight": (d, f)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    for name in names:
        if name.endswith(".bias") and name[:-len("bias")] + "weight" in shapes:
            shapes[name] = shapes[name[:-len("bias")] + "weight"][:1]
    return shapes


def check_shapes(shapes: Mapping[str, tuple], config: Mapping[str, Any]) -> None:
    """Raises if the tensors (name -> shape) miss, add or mis-shape a parameter of the model."""
    expected = expected_shapes(config, shapes)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(f"GGUF tensors do not match the config: {missing=} {extra=}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(shapes[name])}, expected {shape}")


def hf_config_from_metadata(metadata: Mapping[str, Any], *, tensor_names: Iterable[str],
                            vocab_rows: int | None = None,
                            rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
    """Hugging Face Llama `config.json` dict from GGUF metadata.

    Args:
        metadata: GGUF key -> value.
        tensor_names: GGUF tensor names (no `output.weight` means tied embeddings; `*.bias`
            tensors set `attention_bias` / `mlp_bias`).
        vocab_rows: rows of `token_embd.weight`, used when no vocabulary size is stored.
        rope_freqs: llama.cpp's per-frequency rope divisors [head_dim / 2], if present.
    """
    arch = check_architecture(metadata)
    names = set(tensor_names)
    biases = {n.split(".")[2] for n in names if n.startswith("blk.") and n.endswith(".bias")}

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", required=False) or get(
        "rope.dimension_count", hidden // n_heads)
    theta = _f32(get("rope.freq_base", 10000.0))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", required=False) or (len(tokens) if tokens else vocab_rows)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads), "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")), "rope_theta": theta,
        "rope_scaling": rope_scaling_from_metadata(metadata, arch, rope_freqs, theta, head_dim),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names, "sliding_window": None,
        "attention_bias": bool(biases & {"attn_q", "attn_k", "attn_v", "attn_output"}),
        "mlp_bias": bool(biases & {"ffn_gate", "ffn_up", "ffn_down"}),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }


def rope_scaling_from_metadata(metadata: Mapping[str, Any], arch: str,
                               rope_freqs: np.ndarray | None, theta: float,
                               head_dim: int) -> dict[str, Any] | None:
    """Hugging Face `rope_scaling` from `{arch}.rope.scaling.*` keys or a `rope_freqs` tensor."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ValueError(f"rope scaling type {kind!r} together with a rope_freqs tensor "
                             "is not supported")
        return llama3_rope_scaling(rope_freqs, theta=theta, head_dim=head_dim)
    if kind == "linear" or (kind is None and factor not in (None, 1.0)):
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind in (None, "none"):
        return None
    raise ValueError(f"{arch}.rope.scaling.type={kind!r} is not supported "
                     "(supported: none, linear, llama3 via rope_freqs)")


def llama3_rope_factors(scaling: Mapping[str, Any], *, theta: float,
                        head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` divisors [head_dim / 2] for Hugging Face llama3 scaling."""
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def llama3_rope_scaling(rope_freqs: np.ndarray, *, theta: float,
                        head_dim: int) -> dict[str, Any] | None:
    """Recovers Hugging Face llama3 rope scaling from llama.cpp's `rope_freqs` [head_dim / 2].

    The frequencies depend only on old_ctx / low_freq_factor and high / low, so the returned
    parameters use low_freq_factor = 1; they reproduce `rope_freqs` exactly (checked).
    """
    freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if freqs.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs has shape {freqs.shape}, expected ({head_dim // 2},)")
    if np.allclose(freqs, 1.0):
        return None
    factor = float(freqs.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (1.0 / freqs - 1.0 / factor) / (1.0 - 1.0 / factor)
    mid = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if mid.sum() < 2:
        raise ValueError(f"cannot infer llama3 rope scaling from rope_freqs={freqs.tolist()}: "
                         "fewer than two frequencies lie in the smoothed band")
    slope, intercept = np.polyfit(1.0 / wavelen[mid], smooth[mid], 1)
    high = 1.0 - 1.0 / intercept
    for digits in (3, 9):  # prefer round values, as in published configs
        scaling = {"rope_type": "llama3", "factor": round(factor, digits),
                   "low_freq_factor": 1.0, "high_freq_factor": round(high, digits),
                   "original_max_position_embeddings": int(round(-slope / intercept))}
        rebuilt = llama3_rope_factors(scaling, theta=theta, head_dim=head_dim)
        if np.allclose(rebuilt, freqs, rtol=1e-4):
            return scaling
    raise ValueError(f"rope_freqs={freqs.tolist()} is not a llama3 rope scaling")


def _f32(value: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))
