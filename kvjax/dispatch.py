"""Attention dispatch: a static `attn_impl` key -> the reference or a Pallas kernel.

`attn_impl` is resolved once (`kvjax.attention.resolve_attn_impl`: "auto" is "pallas_gpu" on GPU,
"pallas_tpu" on TPU, "reference" on CPU) and passed down as a static argument; nothing is
patched. The kernels live in `pallas_kernels` (imported lazily, on first use) and take plain
arrays; this module adapts the cache's store (`kvjax.cache.KVStore`) to them.

Forcing a Pallas implementation off its backend (e.g. ``attn_impl="pallas_tpu"`` on CPU) runs
the kernel in that backend's interpret mode (TPU interpreter / Mosaic GPU interpreter): slow,
but the same kernel code, which is how CPU CI checks generate with every kernel.

Under a device mesh (the loops trace the model in `kvjax.sharding.mesh_context`) the kernels
run per device through `jax.shard_map` (`kvjax.mesh_dispatch`); the jnp paths are left to
XLA's SPMD partitioner.

What falls back to the reference, by design:
  * decode with T > 1 new tokens (multi-token extend): the kernels take one query per sequence;
  * the Mosaic GPU kernels' shape limits (G > 64 query heads per kv head, or head dims that are
    not multiples of 16);
  * a quantized store (`kvjax.quant`) on GPU, and a KIVI-scheme one on TPU: the TPU kernel
    reads int8/fp8 stores with per-entry scales only; the jnp block walk dequantizes per
    block (it too reads only the quantized bytes of the kept entries).
"""

import importlib

import jax

from kvjax.attention_scores import prefill_attention_with_scores_reference
from kvjax.cache import KVCache
from kvjax.mesh_dispatch import context_mesh, sharded_decode, sharded_prefill
from kvjax.store_attention import store_attention
from pallas_kernels import ScoreRows
from pallas_kernels._prefill_common import check_score_rows

_PALLAS = {"pallas_gpu": "pallas_kernels.gpu", "pallas_tpu": "pallas_kernels.tpu"}


def _kernels(attn_impl: str):
    """The kernel module for a Pallas `attn_impl`, or None for the reference."""
    if attn_impl == "reference":
        return None
    if attn_impl not in _PALLAS:
        raise ValueError(f"{attn_impl=} must be resolved first: one of 'reference', "
                         f"{', '.join(map(repr, _PALLAS))}")
    return importlib.import_module(_PALLAS[attn_impl])


def _gpu_shapes_ok(n: int, n_kv: int, *dims: int) -> bool:
    return n // n_kv <= 64 and all(d % 16 == 0 for d in dims)


def decode_attention(q: jax.Array, q_pos: jax.Array, cache: KVCache, layer, *, attn_impl: str,
                     scale: float | None = None,
                     sliding_window: int | None = None) -> jax.Array:
    """`cached_attention_reference` semantics for layer `layer` through `attn_impl`.

    The kernels get the whole store (k [B, R, P, Dk], v, pos) with the layer's segment
    offsets and lengths [B, K] and read the segments in place; without a kernel
    `store_attention` walks the segments block by block in jnp. Neither copies a segment.
    A store shared by the batch (slot arrays of batch 1: `kvjax.context.share`, the engine's
    pool in kvjax/engine/pool.py) goes to the kernels as it is: every sequence reads it at
    its own offsets.

    Args:
      q: [B, T, N, H] post-RoPE queries; q_pos: [B, T]; cache: the cache (new tokens already
        in the tail); layer: static or traced layer index.
      attn_impl: "reference" | "pallas_gpu" | "pallas_tpu" (resolved, static).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    store, tail = cache.store, cache.tail.layer(layer)
    kernels = _kernels(attn_impl)
    use_kernel = kernels is not None and q.shape[1] == 1 and _kernel_reads(
        attn_impl, store) and (attn_impl != "pallas_gpu" or _gpu_shapes_ok(
            q.shape[2], store.n_kv_heads, q.shape[3], store.k.shape[3], store.v.shape[3]))
    if not use_kernel:
        return store_attention(q, q_pos, store, layer, tail, scale=scale,
                               sliding_window=sliding_window)
    pick = lambda x: None if x is None else x[:, layer]
    args = (q[:, 0], store.k, store.v, store.length[:, layer], store.pos, tail.k, tail.v,
            tail.pos, tail.count, q_pos[:, 0])
    kw = dict(channels=pick(store.channels), value_channels=pick(store.value_channels),
              scale=scale, sliding_window=sliding_window, prefix_offset=store.offset[:, layer],
              max_prefix_len=store.max_segment, **_scale_args(store))
    mesh = context_mesh()
    if mesh is None:
        return kernels.decode_attention(*args, **kw)[:, None]
    return sharded_decode(kernels.decode_attention, mesh, *args, **kw)[:, None]


def _kernel_reads(attn_impl: str, store) -> bool:
    """The kernel reads this store: float stores always; a quantized one only the TPU kernel,
    with per-entry scales (`TokenScales`)."""
    quant = store.quant
    return quant is None or (attn_impl == "pallas_tpu" and quant.scheme.per_entry)


def _scale_args(store) -> dict:
    if store.quant is None:
        return {}
    return dict(prefix_k_scale=store.k_scale, prefix_v_scale=store.v_scale)


def prefill_attention_with_scores(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                                  *, attn_impl: str, scale: float | None = None,
                                  sliding_window: int | None = None,
                                  score_rows: ScoreRows | None = None
                                  ) -> tuple[jax.Array, jax.Array | None]:
    """Causal prefill attention and, unless `score_rows` is None, column sums of it.

    The one place that picks the implementation: the kernel of `attn_impl` where it takes
    the shapes, else `prefill_attention_with_scores_reference` (one chunked pass).

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; lengths: [B].
      attn_impl: "reference" | "pallas_gpu" | "pallas_tpu" (resolved, static).
      score_rows: None | AllRows() | LastRows(W) | ProxyRows(rows [B, P])
        (`pallas_kernels._prefill_common`).

    Returns:
      out [B, T, N, H] and colsums [B, N, T] f32 (None when score_rows is None).
    """
    score_rows = check_score_rows(score_rows)
    kernels = _kernels(attn_impl)
    use_kernel = kernels is not None and (
        attn_impl != "pallas_gpu" or _gpu_shapes_ok(q.shape[2], k.shape[2], q.shape[3]))
    if use_kernel:
        kw = dict(scale=scale, sliding_window=sliding_window, score_rows=score_rows)
        mesh = context_mesh()
        if mesh is not None:
            return sharded_prefill(kernels.prefill_attention_with_scores, mesh, q, k, v,
                                   lengths, **kw)
        return kernels.prefill_attention_with_scores(q, k, v, lengths, **kw)
    return prefill_attention_with_scores_reference(q, k, v, lengths, scale=scale,
                                                   sliding_window=sliding_window,
                                                   score_rows=score_rows)


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                      attn_impl: str, scale: float | None = None,
                      sliding_window: int | None = None) -> jax.Array:
    """`kvjax.attention_scores.prefill_attention_reference` semantics through `attn_impl`:
    out [B, T, N, H]."""
    return prefill_attention_with_scores(q, k, v, lengths, attn_impl=attn_impl, scale=scale,
                                         sliding_window=sliding_window, score_rows=None)[0]
