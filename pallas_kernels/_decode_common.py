"""Argument checks and query preparation shared by the TPU and GPU decode kernels."""

import math

import jax
import jax.numpy as jnp


def check_decode_args(q, prefix_k, prefix_v, prefix_len, prefix_pos, tail_k, tail_v, tail_pos,
                      tail_count, q_pos, channels, scale,
                      value_channels=None) -> tuple[float, jax.Array]:
    """Validate the decode kernels' shapes; return (scale, q grouped as [B, K, G, H]).

    The store's slot arrays (prefix_k, prefix_v, prefix_pos) have batch B, or batch 1 for a
    store shared by the B sequences (`kvjax.context.share`, the engine's pool
    `kvjax/engine/pool.py`); every other argument has batch B.

    Raises:
      ValueError: on any shape mismatch.
    """
    b, n, h = q.shape
    if prefix_k.ndim != 4 or prefix_k.shape[0] not in (1, b):
        raise ValueError(f"prefix_k.shape={prefix_k.shape} must be [B={b}, R, C, Dk] or "
                         "[1, R, C, Dk] (a store shared by the batch)")
    sb, rows, c, dk = prefix_k.shape
    n_kv = tail_k.shape[1] if tail_k.ndim == 4 else rows
    s = tail_k.shape[2]
    if n % n_kv:
        raise ValueError(f"N={n} query heads must be a multiple of K={n_kv} kv heads")
    if n_kv % rows:
        raise ValueError(f"prefix rows R={rows} must divide the K={n_kv} kv heads")
    expected = {"prefix_v": (prefix_v.shape[:3], (sb, rows, c)),
                "prefix_len": (prefix_len.shape, (b, n_kv)),
                "prefix_pos": (prefix_pos.shape, (sb, rows, c)),
                "tail_k": (tail_k.shape, (b, n_kv, s, h)),
                "tail_v": (tail_v.shape, (b, n_kv, s, h)),
                "tail_pos": (tail_pos.shape, (b, s)),
                "tail_count": (tail_count.shape, (b,)),
                "q_pos": (q_pos.shape, (b,))}
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name}.shape={tuple(got)} must be {want} (B={b}, store "
                             f"batch {sb}, K={n_kv}, R={rows}, C={c}, S={s}, H={h})")
    if channels is None and dk != h:
        raise ValueError(f"prefix keys have Dk={dk} != H={h} channels but channels is None")
    if channels is not None and tuple(channels.shape) != (b, n_kv, dk):
        raise ValueError(f"channels.shape={tuple(channels.shape)} must be {(b, n_kv, dk)}")
    hv = prefix_v.shape[3]
    if value_channels is None and hv != h:
        raise ValueError(f"prefix values have Hv={hv} != H={h} channels but value_channels "
                         "is None")
    if value_channels is not None and tuple(value_channels.shape) != (b, n_kv, hv):
        raise ValueError(f"value_channels.shape={tuple(value_channels.shape)} must be "
                         f"{(b, n_kv, hv)}")
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    return scale, q.reshape(b, n_kv, n // n_kv, h)


def gather_thin_queries(qg: jax.Array, channels: jax.Array | None) -> jax.Array:
    """qg [B, K, G, H], channels [B, K, Dk] -> queries on the kept channels [B, K, G, Dk]."""
    if channels is None:
        return qg
    idx = jnp.broadcast_to(channels[:, :, None, :].astype(jnp.int32),
                           qg.shape[:3] + channels.shape[-1:])
    return jnp.take_along_axis(qg, idx, axis=-1)


def merge_prefix_tail(o_prefix: jax.Array, o_tail: jax.Array,
                      value_channels: jax.Array | None) -> jax.Array:
    """Sum the prefix part [B, K, G, Hv] and the tail part [B, K, G, H] of the output.

    With thin values (ThinK value pruning) the prefix part lands on `value_channels`
    [B, K, Hv] of the H output channels; the other channels get no prefix contribution.
    """
    if value_channels is None:
        return o_prefix + o_tail
    idx = jnp.broadcast_to(value_channels[:, :, None, :].astype(jnp.int32), o_prefix.shape)
    scattered = jnp.put_along_axis(jnp.zeros_like(o_tail), idx, o_prefix, axis=-1,
                                   inplace=False)
    return scattered + o_tail


def check_prefix_window(prefix_offset: jax.Array, max_prefix_len: int | None,
                        prefix_len: jax.Array, capacity: int) -> tuple[jax.Array, int]:
    """Validate the segment arguments; return (offsets [B*K] int32, max_len).

    The prefix of kv head (b, h) is slots [offset, offset + prefix_len) of row h // (K // R)
    of the `capacity`-slot prefix arrays (a segment of the cache's store, read in place),
    offset from `prefix_offset` [B, K]; `max_prefix_len` (static, default `capacity`) bounds
    prefix_len and sizes the grid. The caller guarantees prefix_len <= max_prefix_len and
    offset + prefix_len <= capacity (traced values are not checked).

    Raises:
      ValueError: on a bad offset shape or a bound outside [1, capacity].
    """
    b, n_kv = prefix_len.shape
    max_len = capacity if max_prefix_len is None else int(max_prefix_len)
    if not 1 <= max_len <= capacity:
        raise ValueError(f"max_prefix_len={max_prefix_len} must be in [1, C={capacity}]")
    if prefix_offset is None:
        raise ValueError(f"{prefix_offset=}: the kernels read segments of the store; pass "
                         f"prefix_offset [B={b}, K={n_kv}] (zeros: each segment at slot 0)")
    if tuple(prefix_offset.shape) != (b, n_kv):
        raise ValueError(f"prefix_offset.shape={tuple(prefix_offset.shape)} must be "
                         f"{(b, n_kv)} (B, K)")
    return prefix_offset.astype(jnp.int32).reshape(-1), max_len


QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")


def check_prefix_scales(prefix_k, prefix_v, k_scale, v_scale) -> tuple:
    """() for a float prefix, (k_scale, v_scale) [B, R, C] for a quantized one (batch 1 with
    a shared store: the scales are slot arrays, shaped like prefix_k's first three axes).

    Raises:
      ValueError: scales missing for int8/fp8 keys or values, given for float ones, or of
        the wrong shape.
    """
    quantized = str(prefix_k.dtype) in QUANTIZED_DTYPES or str(prefix_v.dtype) in QUANTIZED_DTYPES
    given = (k_scale is not None, v_scale is not None)
    if not quantized and any(given):
        raise ValueError(f"prefix_k.dtype={prefix_k.dtype}: scales are only for int8 / "
                         "float8_e4m3fn prefixes")
    if not quantized:
        return ()
    if not all(given):
        raise ValueError(f"prefix_k.dtype={prefix_k.dtype}, prefix_v.dtype={prefix_v.dtype}: a "
                         "quantized prefix needs prefix_k_scale and prefix_v_scale [B, R, C]")
    want = tuple(prefix_k.shape[:3])
    for name, x in (("prefix_k_scale", k_scale), ("prefix_v_scale", v_scale)):
        if tuple(x.shape) != want:
            raise ValueError(f"{name}.shape={tuple(x.shape)} must be {want} (one scale per "
                             "slot: the 'token' scheme)")
    return k_scale, v_scale
