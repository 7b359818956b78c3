"""A compressed context that outlives its prefill: asked many questions, now or later.

`Pipeline.compress(context, press=...)` returns a `CompressedContext`: the compressed cache
(store + the tail the press left, e.g. ThinK's recent window), the logits after the context,
the context's token ids, the press and a fingerprint of the model. `Pipeline.ask` answers
from it without touching the context again; `save` / `load` keep it on disk with orbax (the
arrays) and a JSON file (the rest), and `load` refuses another model (`kvjax.fingerprint`),
another dtype, and a context.json or arrays that do not fit the model.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache, KVStore, Tail
from kvjax.fingerprint import id_dtype, model_fingerprint
from kvjax.presses.registry import DECODE_HOOKS
from kvjax.quant import KVQuant

FORMAT = "kvjax-compressed-context"
VERSION = 2  # 2: the fingerprint covers every parameter leaf and the dtype
_META = "context.json"
_ARRAYS = "arrays"


@dataclasses.dataclass(frozen=True)
class CompressedContext:
    """A compressed context for one sequence.

    Attributes:
      cache: KVCache with batch 1 (its tail holds what compression left there, usually 0).
      logits: [1, V] the next-token logits after the context.
      context_ids: the context's token ids (what was compressed).
      press: a description of the press (`repr`), None for the full cache.
      model_id: the fingerprint of the model that made it (`model_fingerprint`).
    """

    cache: KVCache
    logits: jax.Array
    context_ids: tuple[int, ...]
    press: str | None
    model_id: str

    @property
    def n_context(self) -> int:
        return len(self.context_ids)

    def save(self, path: str | Path, info: dict | None = None) -> Path:
        """Write the context to a new directory `path` (orbax arrays + context.json); `info`
        (JSON) is stored alongside, e.g. the model source the CLI reloads."""
        import orbax.checkpoint as ocp
        path = Path(path).absolute()
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{str(path)!r} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        arrays = _arrays(self)
        empty = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items() if v.size == 0}
        with ocp.StandardCheckpointer() as ckptr:  # orbax refuses zero-size arrays
            ckptr.save(path / _ARRAYS, {k: v for k, v in arrays.items() if k not in empty})
        meta = dict(format=FORMAT, version=VERSION, model_id=self.model_id, press=self.press,
                    empty=empty,
                    context_ids=list(self.context_ids), hook=_hook_to_json(self.cache.hook),
                    max_segment=self.cache.store.max_segment, info=info or {},
                    quant=None if self.cache.store.quant is None
                    else self.cache.store.quant.to_dict())
        (path / _META).write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, model_id: str | None = None
             ) -> "CompressedContext":
        """Read a context written by `save`; `model` (or its `model_id`) must be the one that
        made it, in the same dtype. Raises ValueError for a foreign model or dtype, a
        context.json that is not valid or arrays whose shapes do not fit the model's config;
        FileNotFoundError / ValueError for a missing or truncated checkpoint."""
        import orbax.checkpoint as ocp
        path = Path(path).absolute()
        meta = _read_meta(path)
        _check_model(path, meta["model_id"], model_id if model is None else
                     model_fingerprint(model))
        try:
            with ocp.StandardCheckpointer() as ckptr:
                arrays = ckptr.restore(path / _ARRAYS)
        except Exception as e:  # orbax raises its own types for missing or partial files
            raise ValueError(f"cannot read the arrays of {str(path)!r} (truncated or not a "
                             f"kvjax compressed context): {e}") from e
        for name, (shape, dtype) in meta["empty"].items():
            arrays[name] = np.zeros(shape, dtype)
        _check_shapes(path, arrays, getattr(model, "config", None), meta)
        return _from_arrays(arrays, meta)


def read_info(path: str | Path) -> dict:
    """The `info` a context was saved with (without reading its arrays)."""
    return _read_meta(Path(path).absolute()).get("info", {})


def _arrays(ctx: CompressedContext) -> dict:
    st, tl = ctx.cache.store, ctx.cache.tail
    out = dict(k=st.k, v=st.v, pos=st.pos, offset=st.offset, length=st.length,
               tail_k=tl.k, tail_v=tl.v, tail_pos=tl.pos, tail_count=tl.count,
               next_pos=ctx.cache.next_pos, logits=ctx.logits)
    for name in ("channels", "value_channels", "extra", "k_scale", "v_scale"):
        if getattr(st, name) is not None:
            out[name] = getattr(st, name)
    return out


def _from_arrays(a: dict, meta: dict) -> CompressedContext:
    need = {"k", "v", "pos", "offset", "length", "tail_k", "tail_v", "tail_pos", "tail_count",
            "next_pos", "logits"}
    if not need <= set(a):
        raise ValueError(f"compressed context lacks arrays {sorted(need - set(a))}")
    j = {k: jnp.asarray(v) for k, v in a.items()}
    store = KVStore(k=j["k"], v=j["v"], pos=j["pos"], offset=j["offset"], length=j["length"],
                    channels=j.get("channels"), value_channels=j.get("value_channels"),
                    extra=j.get("extra"), k_scale=j.get("k_scale"), v_scale=j.get("v_scale"),
                    max_segment=int(meta["max_segment"]),
                    quant=None if meta.get("quant") is None
                    else KVQuant.from_dict(meta["quant"]))
    tail = Tail(k=j["tail_k"], v=j["tail_v"], pos=j["tail_pos"], count=j["tail_count"])
    cache = KVCache(store=store, tail=tail, next_pos=j["next_pos"],
                    hook=_hook_from_json(meta["hook"]))
    return CompressedContext(cache=cache, logits=j["logits"],
                             context_ids=tuple(meta["context_ids"]), press=meta["press"],
                             model_id=meta["model_id"])


# context.json: every key `save` writes and its JSON type(s)
_META_TYPES = dict(format=str, version=int, model_id=str, press=(str, type(None)), empty=dict,
                   context_ids=list, hook=(dict, type(None)), max_segment=int, info=dict,
                   quant=(dict, type(None)))


def _read_meta(path: Path) -> dict:
    """context.json of the context at `path`, checked: valid JSON, this format and version,
    every key of `_META_TYPES` with its type. ValueError names the file and the field."""
    file = path / _META
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} not found: not a kvjax compressed "
                                "context (written by CompressedContext.save)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{str(file)!r} holds a {type(meta).__name__}, not a JSON object")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is {meta.get('format')!r} version "
                         f"{meta.get('version')!r}, not {FORMAT!r} version {VERSION}")
    missing = sorted(set(_META_TYPES) - set(meta))
    if missing:
        raise ValueError(f"{str(file)!r} lacks the field(s) {missing}")
    for key, types in _META_TYPES.items():
        if not isinstance(meta[key], types) or isinstance(meta[key], bool):
            raise ValueError(f"{str(file)!r}: field {key!r} is {meta[key]!r}, not "
                             f"{_type_names(types)}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in meta["context_ids"]):
        raise ValueError(f"{str(file)!r}: field 'context_ids' must hold token ids (ints)")
    for name, entry in meta["empty"].items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(isinstance(d, int) for d in entry[0]) and isinstance(entry[1], str)):
            raise ValueError(f"{str(file)!r}: field 'empty.{name}' is {entry!r}, not "
                             "[shape, dtype]")
    return meta


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_model(path: Path, saved: str, want: str | None) -> None:
    """ValueError unless the fingerprint `want` of the loading model (None: unchecked) is
    `saved`, the one in context.json; a different dtype is named as such."""
    if want is None or want == saved:
        return
    if id_dtype(saved) != id_dtype(want):
        raise ValueError(f"{str(path)!r} was compressed by a model with dtype "
                         f"{id_dtype(saved)}, this model's dtype is {id_dtype(want)}: load "
                         f"the model in {id_dtype(saved)} (or compress again)")
    raise ValueError(f"{str(path)!r} was compressed by model {saved}, not this one "
                     f"({want}): load it with the model that made it")


# Every array's shape: 1 is the batch; L, K, H, V come from the model's config; the other
# letters from the first array that has them (Dk = Dv = H without ThinK's channels).
_SHAPES = dict(k="1 R P Dk", v="1 R P Dv", pos="1 R P", offset="1 L K", length="1 L K",
               channels="1 L K Dk", value_channels="1 L K Dv", extra="1 R P E",
               v_scale="1 R P", tail_k="L 1 K S H", tail_v="L 1 K S H", tail_pos="1 S",
               tail_count="1", next_pos="1", logits="1 V")
_CONFIG_DIMS = dict(L="n_layers", K="n_kv_heads", H="head_dim", V="vocab_size")


def _check_shapes(path: Path, arrays: dict, config, meta: dict) -> None:
    """ValueError naming the first array whose shape disagrees with `_SHAPES` under the
    model's `config` (None: only with each other) and the file it came from (context.json
    for the zero-size arrays it records)."""
    dims = {d: getattr(config, f) for d, f in _CONFIG_DIMS.items() if hasattr(config, f)}
    if "channels" not in arrays and "H" in dims:
        dims["Dk"] = dims["H"]
    if "value_channels" not in arrays and "H" in dims:
        dims["Dv"] = dims["H"]
    kivi = (meta["quant"] or {}).get("scheme") == "kivi"
    specs = dict(_SHAPES, k_scale="1 R G Dk" if kivi else "1 R P")
    for name, spec in specs.items():
        if name in arrays:
            file = path / (_META if name in meta["empty"] else _ARRAYS)
            _match_shape(file, name, tuple(arrays[name].shape), spec.split(), dims)
    if "K" in dims and "R" in dims and dims["K"] % dims["R"]:
        raise ValueError(f"{str(path)!r}: array 'k' has {dims['R']} rows, which do not "
                         f"divide the model's {dims['K']} kv heads")


def _match_shape(file: Path, name: str, shape: tuple, spec: list, dims: dict) -> None:
    """Check `shape` against `spec` (ints and letters), binding new letters in `dims`."""
    known = {d: dims[d] for d in spec if d in dims}
    ok = len(shape) == len(spec)
    for n, d in zip(shape, spec) if ok else ():
        want = int(d) if d.isdigit() else dims.setdefault(d, n)
        ok = ok and n == want
    if not ok:
        got = ", ".join(f"{d}={v}" for d, v in known.items())
        raise ValueError(f"{str(file)!r}: array {name!r} has shape {list(shape)}, "
                         f"not [{', '.join(spec)}]" + (f" with {got}" if got else ""))


def _hook_to_json(hook) -> dict | None:
    """The decode hook a compressed cache carries (a press's own: UNComp's ring decode)."""
    if hook is None:
        return None
    name = type(hook).__name__
    if DECODE_HOOKS.get(name) is not type(hook):
        raise ValueError(f"cannot save a cache carrying {name}: the savable decode hooks "
                         f"are {sorted(DECODE_HOOKS)} (kvjax/presses/registry.py)")
    return {"type": name, **dataclasses.asdict(hook)}


def _hook_from_json(d: dict | None):
    if d is None:
        return None
    d = dict(d)
    kind = DECODE_HOOKS.get(d.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown decode hook {d!r}; known: {sorted(DECODE_HOOKS)}")
    return kind(**d)


def with_tail(cache: KVCache, capacity: int) -> KVCache:
    """The cache with its tail grown to `capacity` slots (same contents and count)."""
    t = cache.tail
    extra = capacity - t.capacity
    if extra < 0:
        raise ValueError(f"tail of {t.capacity} slots cannot shrink to {capacity=}")
    pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
    tail = Tail(k=pad(t.k, 3), v=pad(t.v, 3), pos=pad(t.pos, 1), count=t.count)
    return dataclasses.replace(cache, tail=tail)


def for_batch(cache: KVCache, n: int) -> KVCache:
    """The batch-1 cache for n sequences: the store shared (`share`) unless a decode hook
    rewrites it per sequence (UNComp's ring decode), then copied n times."""
    if n == 1:
        return cache
    if cache.hook is None:
        return share(cache, n)
    return _broadcast(cache, n, lambda x: jnp.repeat(x, n, axis=0), copy_store=True)


def share(cache: KVCache, n: int) -> KVCache:
    """The cache for n sequences that share its store (batch 1, not copied): tail, positions
    and table broadcast to batch n. Decode attention reads a shared store in place, every
    sequence at its own offsets: the decode kernels (`kvjax.dispatch`) and the jnp block walk
    (`kvjax.store_attention`) alike."""
    if cache.hook is not None:
        raise ValueError(f"a store that {type(cache.hook).__name__} rewrites per sequence "
                         "cannot be shared: use `for_batch`, which copies it")
    return _broadcast(cache, n, lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]),
                      copy_store=False)


def _broadcast(cache: KVCache, n: int, rep, *, copy_store: bool) -> KVCache:
    """Batch 1 -> n with `rep` on every per-sequence array (batch axis 0; the tail's k/v have
    it at axis 1); the store's slot arrays too when `copy_store`."""
    st, t = cache.store, cache.tail
    r = lambda x: None if x is None else rep(x)
    slots = dict(k=r(st.k), v=r(st.v), pos=r(st.pos), extra=r(st.extra)) if copy_store else {}
    store = dataclasses.replace(st, offset=r(st.offset), length=r(st.length),
                                channels=r(st.channels), value_channels=r(st.value_channels),
                                **slots)
    lead = lambda x: jnp.moveaxis(rep(jnp.moveaxis(x, 1, 0)), 0, 1)
    tail = Tail(k=lead(t.k), v=lead(t.v), pos=r(t.pos), count=r(t.count))
    return dataclasses.replace(cache, store=store, tail=tail, next_pos=r(cache.next_pos))
