"""Quantized store: kept keys and values in int8 or float8_e4m3fn, with f32 scales.

Presses score full-precision keys; `quantize_store` runs after selection, inside the same
jitted prefill, on the packed store only. The dense tail stays in the compute dtype (a decode
hook that merges it into the store quantizes what it writes). Decode attention reads the
quantized store and dequantizes per block (`kvjax.cache.gather_kv`, the Pallas TPU kernel).

Two schemes (docs/architecture.md, "Quantized store"), both symmetric absmax, each a small
class that says how its key scales are laid out:

* `TokenScales()`: one scale per stored entry (token, kv head) for keys and one for values:
  `k_scale, v_scale [B, R, P]`. Cheap to apply inside attention: the key scale multiplies a
  logit, the value scale a probability.
* `KiviScales(group=32)`: KIVI's grouping (arXiv 2402.02750): keys per channel over a group
  of `group` consecutive store slots (`k_scale [B, R, P // group, Dk]`), values per token
  (`v_scale [B, R, P]`). KIVI itself is asymmetric 2-bit with a zero point; at 8 bits the
  symmetric form keeps its grouping without a zero point.

Axis letters as in `kvjax.cache`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

KV_DTYPES = {"int8": (jnp.int8, 127.0), "float8_e4m3fn": (jnp.float8_e4m3fn, 448.0)}


@dataclasses.dataclass(frozen=True)
class TokenScales:
    """One key scale per stored entry: k_scale [B, R, P] (the default scheme)."""

    name = "token"
    per_entry = True
    slot_multiple = 1

    def quantize_keys(self, k: jax.Array, quant: "KVQuant") -> tuple[jax.Array, jax.Array]:
        """k [B, R, P, D] -> (q [B, R, P, D], scale [B, R, P])."""
        return quantize_token(k, quant)

    def scale_slots(self, idx: jax.Array) -> jax.Array:
        """Store slots -> the key-scale slots that hold their scales."""
        return idx

    def per_channel(self, scale: jax.Array) -> jax.Array:
        """Gathered key scales [..., M] -> broadcastable to keys [..., M, D]."""
        return scale[..., None]


@dataclasses.dataclass(frozen=True)
class KiviScales:
    """KIVI's key scales: per channel over `group` consecutive slots, k_scale
    [B, R, P // group, Dk]; the store's slot count is a multiple of `group`."""

    group: int = 32
    name = "kivi"
    per_entry = False

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or (
                self.group < 8 or self.group % 8):
            raise ValueError(f"group={self.group!r} must be a positive multiple of 8")

    @property
    def slot_multiple(self) -> int:
        return self.group

    def quantize_keys(self, k: jax.Array, quant: "KVQuant") -> tuple[jax.Array, jax.Array]:
        """k [B, R, P, D] -> (q [B, R, P, D], scale [B, R, P // group, D])."""
        return quantize_groups(k, quant, self.group)

    def scale_slots(self, idx: jax.Array) -> jax.Array:
        return idx // self.group

    def per_channel(self, scale: jax.Array) -> jax.Array:
        return scale

    def expand(self, scale: jax.Array) -> jax.Array:
        """[B, R, P // group, D] -> one scale per slot [B, R, P, D]."""
        return expand_groups(scale, self.group)


SCHEMES = {"token": TokenScales, "kivi": KiviScales}


@dataclasses.dataclass(frozen=True)
class KVQuant:
    """How the store is quantized (static: part of the compiled prefill's key).

    Attributes:
      dtype: "int8" or "float8_e4m3fn".
      scheme: `TokenScales()` (per-entry absmax) or `KiviScales(group)` (keys per channel
        over `group` slots).
    """

    dtype: str = "int8"
    scheme: TokenScales | KiviScales = TokenScales()

    def __post_init__(self):
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={self.dtype!r} is not supported; one of "
                             f"{', '.join(map(repr, KV_DTYPES))} (or None: unquantized)")
        if not isinstance(self.scheme, (TokenScales, KiviScales)):
            raise ValueError(f"scheme={self.scheme!r} must be kvjax.quant.TokenScales() or "
                             "kvjax.quant.KiviScales(group=...)")

    def to_dict(self) -> dict:
        """JSON form (a saved context's meta): dtype, scheme name and the KIVI group."""
        out = {"dtype": self.dtype, "scheme": self.scheme.name}
        if isinstance(self.scheme, KiviScales):
            out["group"] = self.scheme.group
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "KVQuant":
        """The inverse of `to_dict` (a token scheme's saved "group" is ignored)."""
        name = d.get("scheme", "token")
        if name not in SCHEMES:
            raise ValueError(f"scheme={name!r} is not one of {sorted(SCHEMES)}")
        scheme = KiviScales(group=d.get("group", 32)) if name == "kivi" else TokenScales()
        return cls(dtype=d.get("dtype"), scheme=scheme)

    @property
    def storage_dtype(self):
        return KV_DTYPES[self.dtype][0]

    @property
    def qmax(self) -> float:
        return KV_DTYPES[self.dtype][1]

    @property
    def slot_multiple(self) -> int:
        """The store's slot count must be a multiple of this (whole key groups)."""
        return self.scheme.slot_multiple


def resolve_kv_quant(kv_dtype) -> KVQuant | None:
    """`kv_dtype` as users pass it (None, "int8", "float8_e4m3fn", "bfloat16"/"float32" for
    unquantized, or a KVQuant) -> KVQuant or None; checks that the backend has the dtype."""
    if kv_dtype is None or isinstance(kv_dtype, KVQuant):
        quant = kv_dtype
    elif isinstance(kv_dtype, str):
        quant = None if kv_dtype in ("none", "float32", "bfloat16") else KVQuant(dtype=kv_dtype)
    else:
        raise ValueError(f"{kv_dtype=} must be None, a string such as 'int8', or a KVQuant")
    if quant is not None:
        check_backend(quant.dtype, jax.default_backend())
    return quant


@functools.cache
def _backend_converts(dtype: str, backend: str) -> str:
    """'' when `backend` converts f32 <-> dtype exactly on a small probe, else the error."""
    del backend  # part of the cache key: the probe runs on the default backend
    try:
        x = jnp.asarray([1.0, -2.0, 64.0], jnp.float32)  # exact in every storage dtype
        back = jax.jit(lambda y: y.astype(KV_DTYPES[dtype][0]).astype(jnp.float32))(x)
        ok = bool(jnp.all(back == x))
        return "" if ok else f"the round trip of {x.tolist()} gave {back.tolist()}"
    except Exception as e:  # noqa: BLE001 - any backend failure is reported by name
        return repr(e)


def check_backend(dtype: str, backend: str, probe=_backend_converts) -> None:
    """Raise ValueError naming the dtype and backend when the backend cannot store it.

    `probe(dtype, backend)` returns '' or the failure (default: a jitted round trip)."""
    err = probe(dtype, backend)
    if err:
        raise ValueError(f"kv_dtype={dtype!r} is not available on the {backend!r} backend: "
                         f"{err}")


def absmax_scale(x: jax.Array, axis, qmax: float) -> jax.Array:
    """max |x| over `axis` / qmax in f32 (1 where the slice is all zeros)."""
    a = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis)
    return jnp.where(a > 0, a / qmax, 1.0)


def to_storage(x: jax.Array, scale: jax.Array, quant: KVQuant) -> jax.Array:
    """x / scale (scale broadcast to x) in the storage dtype: rounded and clipped for int8,
    cast (round to nearest) for fp8."""
    y = x.astype(jnp.float32) / scale
    if quant.dtype == "int8":
        y = jnp.clip(jnp.round(y), -quant.qmax, quant.qmax)
    return y.astype(quant.storage_dtype)


def quantize_token(x: jax.Array, quant: KVQuant) -> tuple[jax.Array, jax.Array]:
    """Per-entry absmax over the last axis: x [..., D] -> (q [..., D], scale [...])."""
    s = absmax_scale(x, -1, quant.qmax)
    return to_storage(x, s[..., None], quant), s


def quantize_groups(x: jax.Array, quant: KVQuant, g: int) -> tuple[jax.Array, jax.Array]:
    """KIVI keys: x [B, R, P, D] -> (q [B, R, P, D], scale [B, R, P // g, D]), one scale
    per channel over each group of `g` consecutive slots."""
    b, r, p, d = x.shape
    if p % g:
        raise ValueError(f"store slots P={p} must be a multiple of the key group {g}")
    xg = x.reshape(b, r, p // g, g, d)
    s = absmax_scale(xg, 3, quant.qmax)  # [B, R, P/g, D]
    return to_storage(xg, s[:, :, :, None], quant).reshape(x.shape), s


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q [..., D] * scale (broadcast to q) in f32."""
    return q.astype(jnp.float32) * scale


def expand_groups(scale: jax.Array, group: int) -> jax.Array:
    """KIVI key scales [B, R, P // group, D] -> one per slot [B, R, P, D]."""
    return jnp.repeat(scale, group, axis=2)
