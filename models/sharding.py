"""How a Decoder's parameters lie on a `("data", "model")` device mesh.

Tensor parallel over `"model"`, replicated over `"data"` (docs/architecture.md, "Meshes"):

| parameter | sharded axis | over `"model"` when |
|---|---|---|
| `q_proj` kernel [L, D, N H], `o_proj` [L, N H, D] | query heads | N % model == 0 |
| `k_proj`, `v_proj` kernels [L, D, K H] | kv heads | K % model == 0 |
| `gate_proj`, `up_proj` [L, D, F], `down_proj` [L, F, D] | MLP hidden units | F % model == 0 |
| `embed_tokens` [V, D], `lm_head` [D, V] | vocabulary | V % model == 0 |
| norms | - | replicated |

A group that the `"model"` size does not divide is replicated (every device holds all of
it): SmolLM2's 3 kv heads on a model axis of 4 or 8 are replicated, so each device holds the
kv heads its query heads need. `per_device_bytes` states the resulting bytes exactly.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig

MESH_AXES = ("data", "model")


def check_mesh(mesh: Mesh) -> Mesh:
    """Raise unless `mesh` has exactly the axes ("data", "model"); return it with Auto axes.

    kvjax places arrays with sharding constraints, which need Auto axes. `jax.make_mesh`
    makes Explicit axes by default in recent jax: such a mesh is accepted and rebuilt with
    Auto axes over the same devices (sharding-in-types is not used here).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {MESH_AXES} (e.g. "
                         "models.make_mesh(data=2, model=4))")
    auto = jax.sharding.AxisType.Auto
    if all(t == auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over the first data * model devices (clear error if too few)."""
    devices = jax.devices() if devices is None else list(devices)
    if data < 1 or model < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {data=} {model=}")
    if data * model > len(devices):
        raise ValueError(f"a mesh of {data=} x {model=} needs {data * model} devices, "
                         f"only {len(devices)} are available")
    grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def parse_mesh(text: str) -> Mesh:
    """`"data=2,model=4"` -> a mesh (CLI flag `--mesh`)."""
    sizes = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MESH_AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh {text!r}: expected e.g. 'data=2,model=4' (axes {MESH_AXES})")
        sizes[key.strip()] = int(value)
    return make_mesh(sizes.get("data", 1), sizes.get("model", 1))


def _units(path: tuple, cfg: ModelConfig) -> tuple[int, int] | None:
    """(axis sharded over "model", number of units on it) of parameter `path`, or None."""
    leaf = path[-2] if len(path) >= 2 else path[0]
    table = {"q_proj": (-1, cfg.n_heads), "o_proj": (-2, cfg.n_heads),
             "k_proj": (-1, cfg.n_kv_heads), "v_proj": (-1, cfg.n_kv_heads),
             "gate_proj": (-1, cfg.mlp_dim), "up_proj": (-1, cfg.mlp_dim),
             "down_proj": (-2, cfg.mlp_dim), "embed_tokens": (0, cfg.vocab_size),
             "lm_head": (-1, cfg.vocab_size)}
    return table.get(leaf)


def param_spec(path: tuple, ndim: int, cfg: ModelConfig, model_size: int) -> PartitionSpec:
    """PartitionSpec of parameter `path` (NNX state path) with `ndim` dims."""
    spec = [None] * ndim
    units = _units(path, cfg)
    if units is not None and units[1] % model_size == 0 and model_size > 1:
        spec[units[0]] = "model"
    return PartitionSpec(*spec)


def param_sharding(path: tuple, ndim: int, cfg: ModelConfig, mesh: Mesh | None):
    """NamedSharding of parameter `path` on `mesh`; one device when mesh is None."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, param_spec(path, ndim, cfg, mesh.shape["model"]))


def per_device_bytes(shape: tuple, itemsize: int, spec: PartitionSpec, mesh: Mesh) -> int:
    """Bytes of one device's shard of an array `shape` laid out by `spec` on `mesh`."""
    n = math.prod(shape) * itemsize
    for axis in spec:
        for name in (axis,) if isinstance(axis, str) else (axis or ()):
            n //= mesh.shape[name]
    return n


def mesh_of(params) -> Mesh | None:
    """The mesh the parameters' NamedShardings share, or None (one device)."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None
