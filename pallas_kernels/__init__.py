"""Pallas kernels for kvjax's hot attention paths; imports only jax (docs/kernels.md).

Each kernel has a Mosaic TPU version (`pallas_kernels.tpu`) and a Mosaic GPU version
(`pallas_kernels.gpu`) with one signature, and a pure-jnp reference in kvjax that is its
specification:

  * `decode_attention`: one query token per sequence over a compressed prefix (ragged per-head
    lengths, optional thin keys) plus a dense tail, one softmax, GQA-aware
    (spec: `kvjax.attention.cached_attention_reference` with T = 1);
  * `prefill_attention_with_scores`: causal flash attention that also returns column sums of the
    attention probabilities over the rows `score_rows` selects: `AllRows()`, `LastRows(W)`
    or `ProxyRows(rows)` (the `ScoreRows` types, from `pallas_kernels._prefill_common`)
    (spec: `kvjax.attention_scores.prefill_attention_with_scores_reference`).

`interpret=None` runs a kernel compiled on its own backend and in that backend's interpret
mode anywhere else (see `pallas_kernels._interpret`).
"""

import importlib

from pallas_kernels._prefill_common import AllRows, LastRows, ProxyRows, ScoreRows  # noqa: F401

_LAZY = {
    "gpu": ("pallas_kernels.gpu", None),
    "tpu": ("pallas_kernels.tpu", None),
    "gpu_decode_attention": ("pallas_kernels.gpu", "decode_attention"),
    "gpu_prefill_attention_with_scores": ("pallas_kernels.gpu", "prefill_attention_with_scores"),
    "tpu_decode_attention": ("pallas_kernels.tpu", "decode_attention"),
    "tpu_prefill_attention_with_scores": ("pallas_kernels.tpu", "prefill_attention_with_scores"),
}

__all__ = sorted([*_LAZY, "AllRows", "LastRows", "ProxyRows", "ScoreRows"])


def __getattr__(name: str):
    """Import a kernel package on first use (PEP 562): `import pallas_kernels` (and so
    `import kvjax`) loads no Mosaic module until a kernel is asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
