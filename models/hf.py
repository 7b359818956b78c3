"""Hugging Face names -> NNX parameters, and loading a safetensors checkpoint directory.

Name tables only; no model logic. HF stores Linear weights as [out, in]; NNX kernels are
[in, out].
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.config import ModelConfig
from models.decoder import Decoder

_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def hf_name_table(cfg: ModelConfig) -> dict[str, tuple[tuple, bool, int | None]]:
    """Map HF tensor names to (NNX state path, transpose?, layer index or None).

    The decoder's blocks are stacked: layer i of a block parameter is row i of the array at
    the path.
    """
    table = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False, None),
             "model.norm.weight": (("norm", "weight"), False, None)}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = (("lm_head", "kernel"), True, None)
    for i in range(cfg.n_layers):
        for lin in _LAYER_LINEARS:
            table[f"model.layers.{i}.{lin}.weight"] = (("layers", *lin.split("."), "kernel"),
                                                       True, i)
        for norm in _LAYER_NORMS:
            table[f"model.layers.{i}.{norm}.weight"] = (("layers", norm, "weight"), False, i)
    return table


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def decoder_from_tensors(cfg: ModelConfig, tensors, *, dtype=jnp.float32) -> Decoder:
    """Build a Decoder from HF-named arrays (a dict or lazy mapping name -> np.ndarray)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    table = hf_name_table(cfg)
    missing = [name for name in table if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    expected = nnx.to_pure_dict(state)
    stacks: dict = {}  # path -> host array [L, ...] of a stacked block parameter
    pure: dict = {}
    for name, (path, transpose, layer) in table.items():
        arr = np.asarray(tensors[name])
        arr = arr.T if transpose else arr
        want = tuple(_get_path(expected, path).shape)
        if arr.shape != (want if layer is None else want[1:]):
            shown = want if layer is None else want[1:]
            raise ValueError(f"tensor {name} has shape {arr.shape}, expected {shown}")
        if layer is None:
            _set_path(pure, path, jnp.asarray(arr, dtype=dtype))
        else:
            stacks.setdefault(path, np.empty(want, arr.dtype))[layer] = arr
    for path, arr in stacks.items():
        _set_path(pure, path, jnp.asarray(arr, dtype=dtype))
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def read_safetensors_dir(path: Path, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Read every *.safetensors shard of an HF checkpoint directory into f32 numpy arrays."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
    tensors = {}
    for shard in tqdm(shards, desc="loading shards", disable=not progress or len(shards) < 2):
        try:
            with safe_open(str(shard), framework="flax") as f:
                for name in f.keys():
                    tensors[name] = _to_f32(f, name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read safetensors shard {str(shard)!r}: {e}") from e
    return tensors


def _to_f32(f, name: str) -> np.ndarray:
    # framework="flax" reads bf16 too (numpy has no bfloat16); convert on the host.
    return np.asarray(f.get_tensor(name).astype(jnp.float32))


def read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(cfg_file)!r} not found: not a Hugging Face checkpoint dir")
    return json.loads(cfg_file.read_text())
