"""Save and restore converted parameters with orbax-checkpoint, so a second load is fast.

Layout of a saved directory:
  kvjax_model.json   config fields, dtype and format version (the marker `load` looks for)
  params/            orbax StandardCheckpointer of the NNX parameter state
  tokenizer/         tokenizer.json + tokenizer_config.json (HF layout), when a tokenizer is given
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from models.config import ModelConfig, RopeScaling
from models.decoder import Decoder
from models.sharding import param_sharding

SAVED_MARKER = "kvjax_model.json"
FORMAT_VERSION = 2  # 2: decoder blocks stacked over layers


def _config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_ids"] = list(cfg.eos_ids)
    return d


def _config_from_json(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_ids"] = tuple(d.get("eos_ids", ()))
    return ModelConfig(**d)


def save(model: Decoder, tokenizer, path: Path) -> Path:
    """Write params (orbax), config and tokenizer to `path` (created; must not exist)."""
    path = path.absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{str(path)!r} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    dtype = str(model.embed_tokens.embedding[...].dtype)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", nnx.to_pure_dict(state))
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "tokenizer")
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype,
            "config": _config_to_json(model.config)}
    (path / SAVED_MARKER).write_text(json.dumps(meta, indent=1))
    return path


def restore(path: Path, *, dtype=None, mesh=None):
    """Load a directory written by `save` -> (Decoder, Tokenizer or None).

    orbax restores every array straight into its target dtype and sharding (`mesh`, see
    `models.sharding`; one device when None), one array at a time.
    """
    path = path.absolute()
    meta = json.loads((path / SAVED_MARKER).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta.get('format_version')=} in {str(path)!r} is not "
                         f"{FORMAT_VERSION=}")
    cfg = _config_from_json(meta["config"])
    dtype = jnp.dtype(meta["dtype"]) if dtype is None else jnp.dtype(dtype)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    target = _abstract_targets(nnx.to_pure_dict(state), cfg, mesh)
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(path / "params", target)
    state.replace_by_pure_dict(pure)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from models.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_hf_dir(path / "tokenizer")
    return nnx.merge(graphdef, state), tokenizer


def _abstract_targets(pure: dict, cfg: ModelConfig, mesh) -> dict:
    """ShapeDtypeStructs with the shardings `models.sharding` gives every parameter."""
    def target(path, x):
        keys = tuple(getattr(k, "key", k) for k in path)
        sharding = param_sharding(keys, len(x.shape), cfg, mesh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, pure)
