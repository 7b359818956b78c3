"""The cache on a ("data", "model") device mesh (docs/architecture.md, "Meshes").

kvjax does not partition anything by hand: the jitted loops run under XLA's SPMD partitioner
(GSPMD) with the model's parameters sharded (`models.sharding`), and this module pins the
cache's layout with `jax.lax.with_sharding_constraint`:

| array | spec |
|---|---|
| `store.k`, `v`, `pos`, `extra`, scales `[B, R, P, ...]` | `("data", "model", ...)`, R = the model-axis size |
| `store.offset`, `length`, `channels` `[B, L, K, ...]` | `("data",)` (the table is small: replicated over "model") |
| `tail.k`, `tail.v` `[L, B, K, S, H]` | `(None, "data", "model")` |
| `tail.pos`, `tail.count`, `next_pos` | `("data",)` |

An axis is sharded only when the mesh axis divides it; kv heads that the "model" size does
not divide (SmolLM2's 3 on a model axis of 4) keep the store in one row, replicated, as the
projections that produce them are (`models.sharding`). Rows are read and written row by
row (`kvjax.cache.gather_rows`, `scatter_rows`), so per-head scoring, selection and decode
attention run where the heads live.

The mesh travels as `fn.mesh` of the functional model (a static jit argument): a model
loaded with `models.load(..., mesh=mesh)` carries it, and kvjax takes it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kvjax.cache import KVCache


def mesh_of(fn):
    """The mesh a functional model runs on (its `mesh` attribute), or None."""
    return getattr(fn, "mesh", None)


def mesh_context(mesh):
    """Trace under `mesh` (its abstract form), so `kvjax.dispatch` runs the Pallas kernels
    per device with shard_map; no mesh: a no-op context."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _axis(mesh, name: str, size: int) -> str | None:
    n = mesh.shape[name]
    return name if n > 1 and size % n == 0 else None


def store_rows(mesh, n_kv: int) -> int:
    """Store rows R for `n_kv` kv heads: the "model" size when it divides them, else 1."""
    if mesh is None:
        return 1
    return mesh.shape["model"] if _axis(mesh, "model", n_kv) else 1


def check_batch(mesh, batch: int) -> None:
    """Raise unless the "data" axis divides the batch."""
    if mesh is not None and batch % mesh.shape["data"]:
        raise ValueError(f"batch of {batch} sequences is not divisible by the mesh's "
                         f"data axis of {mesh.shape['data']} (pad the batch or use data=1)")


def _constrain(x, mesh, names: tuple):
    """x with dims sharded over `names` (None: replicated) where the mesh axis divides."""
    if x is None:
        return None
    spec = [None if n is None else _axis(mesh, n, x.shape[i]) for i, n in enumerate(names)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def to_host(x) -> np.ndarray:
    """A jax.Array as numpy; one spanning devices of other processes (multi-host, batch over
    "data") is gathered from every process first."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def constrain_batch(x, mesh):
    """An array whose leading axis is the batch, sharded over "data" (inside jit)."""
    return x if mesh is None else _constrain(x, mesh, ("data",))


def constrain_cache(cache: KVCache, mesh) -> KVCache:
    """The cache pinned to the layout in the module docstring (inside jit); no mesh: as is."""
    if mesh is None:
        return cache
    s, t = cache.store, cache.tail
    rows = lambda x: _constrain(x, mesh, ("data", "model"))
    table = lambda x: _constrain(x, mesh, ("data",))
    store = dataclasses.replace(
        s, k=rows(s.k), v=rows(s.v), pos=rows(s.pos), extra=rows(s.extra),
        k_scale=rows(s.k_scale), v_scale=rows(s.v_scale), offset=table(s.offset),
        length=table(s.length), channels=table(s.channels),
        value_channels=table(s.value_channels))
    heads = lambda x: _constrain(x, mesh, (None, "data", "model"))
    tail = dataclasses.replace(t, k=heads(t.k), v=heads(t.v), pos=table(t.pos),
                               count=table(t.count))
    return dataclasses.replace(cache, store=store, tail=tail, next_pos=table(cache.next_pos))
