"""Pallas kernels on a device mesh: each device runs the kernel on its own heads and batch.

XLA's SPMD partitioner cannot split a Pallas call, so under a mesh (`kvjax.sharding`:
the loops trace the model inside `mesh_context`) `kvjax.dispatch` runs the kernels through
`jax.shard_map`: batch over "data", kv heads (and their query heads, store rows, table
columns and tail heads) over "model" when the "model" size divides the kv heads (then the
store has one row per device, `kvjax.sharding.store_rows`). Otherwise heads stay whole and
every "model" device runs the same kernel on its batch share.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def context_mesh():
    """The mesh the loops are tracing under, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _axes(mesh, batch: int, n_kv: int) -> tuple[str | None, str | None]:
    """(batch axis, head axis) names, None where the mesh axis does not divide."""
    d, m = mesh.shape["data"], mesh.shape["model"]
    return ("data" if d > 1 and batch % d == 0 else None,
            "model" if m > 1 and n_kv % m == 0 else None)


_STORE_KEYWORDS = ("prefix_k_scale", "prefix_v_scale")  # slot arrays [B or 1, R, P]


def sharded_decode(kernel, mesh, q, store_k, store_v, length, store_pos, tail_k, tail_v,
                   tail_pos, tail_count, q_pos, **kw):
    """`kernel(q [B, N, H], store_k [B, R, P, Dk], ...)` (a decode kernel's positional
    arguments, see `pallas_kernels.tpu.decode_attention`) under shard_map -> [B, N, H].

    Keyword array arguments (channels, value_channels [B, K, D], prefix_offset [B, K],
    scales [B, R, P]) are split like the table and the store; other keywords are passed as
    they are. A store shared by the batch (store_k, store_v, store_pos and the scales of
    batch 1, everything else of batch B: the engine's pool) keeps its batch axis whole on
    every "data" device; its rows are split over "model" like any store's."""
    b, h = _axes(mesh, q.shape[0], length.shape[1])
    heads, batch = P(b, h), P(b)
    store = P(None, h) if store_k.shape[0] != q.shape[0] else heads
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    names = tuple(arrays)

    def local(q, sk, sv, ln, sp, tk, tv, tp, tc, qp, *extra):
        return kernel(q, sk, sv, ln, sp, tk, tv, tp, tc, qp, **dict(zip(names, extra)),
                      **static)

    specs = ((heads, store, store, heads, store) + (heads, heads, batch, batch, batch)
             + tuple(store if n in _STORE_KEYWORDS else heads for n in names))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(
        q, store_k, store_v, length, store_pos, tail_k, tail_v, tail_pos, tail_count, q_pos,
        *arrays.values())


def sharded_prefill(kernel, mesh, q, k, v, lengths, *, score_rows=None, **kw):
    """`kernel(q [B, T, N, H], k, v [B, T, K, H], lengths [B], score_rows=...)` under
    shard_map -> (out [B, T, N, H], colsums [B, N, T] or None).

    `score_rows` (None or a `pallas_kernels._prefill_common.ScoreRows` pytree; ProxyRows'
    rows [B, P]) is split over the batch like `lengths`."""
    b, h = _axes(mesh, q.shape[0], k.shape[2])
    seq = P(b, None, h)

    def local(q, k, v, lengths, rows):
        out = kernel(q, k, v, lengths, score_rows=rows, **kw)
        return out if score_rows is not None else out[0]

    out_specs = seq if score_rows is None else (seq, P(b, h))
    out = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P(b), P(b)),
                        out_specs=out_specs, check_vma=False)(q, k, v, lengths, score_rows)
    return (out, None) if score_rows is None else out
