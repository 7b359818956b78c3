"""Which model made a compressed context: a cheap fingerprint of the config and the weights.

`model_fingerprint(model)` hashes the config and, for every parameter leaf, its path, shape,
dtype and `SAMPLES` elements strided evenly over the whole flattened leaf (`sample_indices`).
A stacked leaf [L, ...] (the scanned blocks) with L <= SAMPLES has samples in every layer, so
a fine-tune of any weight matrix in any layer changes the id. Only the samples are read (one
jitted gather per model structure, a few KiB to the host), never the whole model; a change
confined to elements that are not sampled goes unseen. The id reads `<dtype>-<digest>`, the
parameters' dtype first, so that a mismatch can say "dtype" (`id_dtype`).
"""

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLES = 1024  # elements read per parameter leaf


def sample_indices(shape: tuple[int, ...]) -> np.ndarray:
    """[n] int64 flat indices i * size // n, n = min(SAMPLES, size), of a leaf of `shape`.

    Their gaps are at most ceil(size / n), so every slice along axis 0 (every layer of a
    stacked leaf) holds at least one when shape[0] <= SAMPLES.
    """
    size = math.prod(shape)
    n = min(SAMPLES, size)
    return np.arange(n, dtype=np.int64) * size // max(n, 1)


@jax.jit
def _samples(leaves: list) -> list:
    """The `sample_indices` elements of every leaf ([n] each), gathered where the leaf lives
    (a point gather: a sharded leaf is read shard by shard, not collected)."""
    return [x.reshape(1) if x.ndim == 0 else
            x[np.unravel_index(sample_indices(x.shape), x.shape)] for x in leaves]


def _path_name(path) -> str:
    """'layers.self_attn.q_proj.kernel' for a pytree key path (NNX's `.value` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(n for n in names if n != "value")


def params_dtype(params) -> str:
    """The dtype of the floating parameter leaves, e.g. "bfloat16" ("a+b" when mixed)."""
    leaves = jax.tree.leaves(params)
    floats = {np.dtype(x.dtype).name for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    return "+".join(sorted(floats or {np.dtype(x.dtype).name for x in leaves}))


def id_dtype(model_id: str) -> str | None:
    """The dtype part of a `model_fingerprint` id, None for an id without one."""
    head, sep, _ = model_id.rpartition("-")
    return head if sep else None


def params_fingerprint(params, config=None) -> str:
    """`<dtype>-<16 hex digits>` of `config` and every leaf of `params` (see the module)."""
    cfg_text = json.dumps(dataclasses.asdict(config), default=str) if (
        dataclasses.is_dataclass(config)) else repr(config)
    h = hashlib.sha256(cfg_text.encode())
    items = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), sample in zip(items, _samples([x for _, x in items])):
        h.update(f"{_path_name(path)} {tuple(leaf.shape)} {np.dtype(leaf.dtype).name};"
                 .encode())
        h.update(np.asarray(sample).tobytes())
    return f"{params_dtype(params)}-{h.hexdigest()[:16]}"


def model_fingerprint(model) -> str:
    """The id of a model (`params_fingerprint` of its config and parameters): the same
    weights, config and dtype give the same id."""
    _, params = model.kvjax_split()
    return params_fingerprint(params, getattr(model, "config", None))
