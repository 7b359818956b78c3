"""Hugging Face names -> NNX parameters, and loading a safetensors checkpoint directory.

Name tables only; no model logic. HF stores Linear weights as [out, in]; NNX kernels are
[in, out].
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.config import ModelConfig
from models.decoder import Decoder
from models.sharding import check_mesh, param_sharding
from models.sources import as_source

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


def decoder_from_tensors(cfg: ModelConfig, tensors, *, dtype=jnp.float32, mesh=None,
                         progress: bool = False) -> Decoder:
    """Build a Decoder from HF-named tensors, streaming: one parameter at a time.

    Args:
      cfg: the model config.
      tensors: a tensor source (`models.sources`: safetensors read tensor by tensor, lazy GGUF) or a
        dict name -> array in HF layout.
      dtype: parameter dtype; each slice is converted from the file's dtype on the host
        (no float32 copy of the model ever exists; a GGUF tensor is dequantized alone).
      mesh: a ("data", "model") `jax.sharding.Mesh` (`models.sharding`): every parameter is
        created with its NamedSharding, and each device's slice is read from the source
        (`jax.make_array_from_callback`; a process reads only its own devices' slices).
        None: one device.
      progress: a progress bar over parameters.
    """
    source = as_source(tensors)
    if mesh is not None:
        mesh = check_mesh(mesh)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)
    params = _group_by_param(cfg, source)
    _check_shapes(source, params, expected)
    pure: dict = {}
    for path, (names, transpose, stacked) in tqdm(params.items(), desc="loading parameters",
                                                  disable=not progress):
        shape = tuple(_get_path(expected, path).shape)
        sharding = param_sharding(path, len(shape), cfg, mesh)
        _set_path(pure, path, _make_param(source, names, transpose, stacked, shape, dtype,
                                          sharding))
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


def _group_by_param(cfg: ModelConfig, source) -> dict[tuple, tuple[list[str], bool, bool]]:
    """NNX path -> (HF names: one, or one per layer in order; transpose?; stacked?)."""
    available = set(source.names())
    table = hf_name_table(cfg)
    missing = [name for name in table if name not in available]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    params: dict = {}
    for name, (path, transpose, layer) in table.items():
        params.setdefault(path, ([], transpose, layer is not None))[0].append(name)
    return params


def _check_shapes(source, params: dict, expected: dict) -> None:
    for path, (names, transpose, stacked) in params.items():
        want = tuple(_get_path(expected, path).shape)[1 if stacked else 0:]
        for name in names:
            got = source.shape(name)
            got = got[::-1] if transpose else got
            if tuple(got) != want:
                raise ValueError(f"tensor {name} has shape {tuple(got)}, expected {want}")


def _make_param(source, names: list[str], transpose: bool, stacked: bool, shape: tuple, dtype,
                sharding):
    """One parameter as a jax.Array laid out by `sharding`, each shard read from the source.

    `names` has one HF name per row of a stacked [L, ...] parameter (or one name)."""
    np_dtype = np.dtype(dtype)

    def read(name, index):  # the NNX-layout slice `index` of HF tensor `name`, converted
        hf_index = tuple(index)[::-1] if transpose else tuple(index)
        rows, rest = (hf_index[0], hf_index[1:]) if hf_index else (slice(None), ())
        arr = source.read(name, rows)[(slice(None),) + rest if hf_index else ()]
        return np.array(arr.T if transpose else arr, dtype=np_dtype)  # a copy: frees the read

    def shard(index):
        if not stacked:
            return read(names[0], index)
        rows = range(len(names))[index[0]]
        first = read(names[rows[0]], index[1:])
        out = np.empty((len(rows),) + first.shape, np_dtype)
        out[0] = first
        for i, layer in enumerate(rows[1:], start=1):
            out[i] = read(names[layer], index[1:])
        return out

    return jax.make_array_from_callback(shape, sharding, shard)


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(cfg_file)!r} not found: not a Hugging Face checkpoint dir")
    return json.loads(cfg_file.read_text())
