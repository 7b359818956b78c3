"""KVzap scorer weights: per-layer linear or two-layer MLP maps from a token's hidden state to
its (log) KVzip score, as plain numpy arrays stacked over layers, applied with jnp.

Layouts follow torch's nn.Linear (weight [out, in]), so kvpress's `KVzapModel` state dict
converts both ways (`from_kvpress_layers`, `state_dict`):

  linear: w [L, K, D], b [L, K]                       score = h @ w[l].T + b[l]
  mlp:    w1 [L, F, D], b1 [L, F], w2 [L, K, F], b2 [L, K]
          score = gelu_erf(h @ w1[l].T + b1[l]) @ w2[l].T + b2[l]

L layers, D the model's hidden size, K its kv heads, F the MLP's hidden size. A
`KVzapWeights` is hashable by content (a static jit argument through the press); the arrays
are read-only numpy.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
# Made by `kvjax train-scorer --model smollm2 --out DIR` (defaults: linear, 32 + 2 contexts of
# 512 tokens of the kvjax.eval corpus, seed 0; about 5 minutes on 2 CPU cores), then
# `cp DIR/kvzap.npz kvjax/kvzap/smollm2_135m_linear.npz`; its info records the recipe and the
# held-out rank correlation (tests/kvjax/test_kvzap_smollm2.py reproduces the latter).
# smollm2_plus: `kvjax train-scorer --model smollm2 --kvzip-plus --out DIR` (the same recipe on
# KVzip+ scores, the KVzap paper's target), then `cp DIR/kvzap.npz
# kvjax/kvzap/smollm2_135m_linear_plus.npz`.
SHIPPED = {"smollm2": "smollm2_135m_linear.npz", "smollm2_plus": "smollm2_135m_linear_plus.npz"}
META_FILE = "kvzap.json"  # in a directory written by `save_dir` (train-scorer --out)
NPZ_FILE = "kvzap.npz"
CHECKPOINT_DIR = "checkpoint"
_HP = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LinearScorer:
    """score = h @ w[l].T + b[l]: arrays w [L, K, D], b [L, K]."""

    name = "linear"
    names = ("w", "b")
    first = ("w", "b")  # the map that reads the hidden state (standardisation folds into it)

    def dims(self, d_model: int, n_kv_heads: int) -> list[int]:
        """Widths from the hidden state to the scores."""
        return [d_model, n_kv_heads]

    def shapes_ok(self, shapes) -> bool:
        (w, b) = shapes
        return len(w) == 3 and b == w[:2]

    def forward(self, params: tuple, h: jax.Array) -> jax.Array:
        """One layer's scorer: h [..., D] f32, params (w [K, D], b [K]) -> [..., K]."""
        w, b = params
        return jnp.einsum("...d,kd->...k", h, w, precision=_HP) + b


@dataclasses.dataclass(frozen=True)
class MLPScorer:
    """score = gelu_erf(h @ w1[l].T + b1[l]) @ w2[l].T + b2[l]: w1 [L, F, D], b1 [L, F],
    w2 [L, K, F], b2 [L, K], F = hidden_dim."""

    hidden_dim: int = 64
    name = "mlp"
    names = ("w1", "b1", "w2", "b2")
    first = ("w1", "b1")

    def __post_init__(self):
        if isinstance(self.hidden_dim, bool) or not isinstance(self.hidden_dim, int) or (
                self.hidden_dim < 1):
            raise ValueError(f"an MLP KVzap scorer needs hidden_dim >= 1, got "
                             f"{self.hidden_dim!r}")

    def dims(self, d_model: int, n_kv_heads: int) -> list[int]:
        return [d_model, self.hidden_dim, n_kv_heads]

    def shapes_ok(self, shapes) -> bool:
        (w1, b1, w2, b2) = shapes
        return (len(w1) == 3 and w1[1] == self.hidden_dim and b1 == w1[:2] and len(w2) == 3
                and w2[0] == w1[0] and w2[2] == w1[1] and b2 == w2[:2])

    def forward(self, params: tuple, h: jax.Array) -> jax.Array:
        """One layer's scorer: h [..., D] f32, params (w1 [F, D], b1, w2 [K, F], b2)."""
        w1, b1, w2, b2 = params
        z = gelu_erf(jnp.einsum("...d,fd->...f", h, w1, precision=_HP) + b1)
        return jnp.einsum("...f,kf->...k", z, w2, precision=_HP) + b2


Scorer = LinearScorer | MLPScorer


def scorer_named(name: str, hidden_dim: int | None = None) -> Scorer:
    """The scorer a file or a command line names ("linear", or "mlp" with its hidden size)."""
    if name == "linear":
        if hidden_dim is not None:
            raise ValueError(f"{hidden_dim=} is for an MLP scorer, not a linear one")
        return LinearScorer()
    if name == "mlp":
        return MLPScorer() if hidden_dim is None else MLPScorer(hidden_dim)
    raise ValueError(f"KVzap scorer {name!r} is not 'linear' or 'mlp'")


def param_shapes(kind, n_layers: int, d_model: int, n_kv_heads: int) -> dict:
    """{array name: shape} of `kind` for a model of these sizes (torch layout [L, out, in])."""
    shapes, names = {}, iter(kind.names)
    for fan_in, fan_out in itertools.pairwise(kind.dims(d_model, n_kv_heads)):
        shapes[next(names)] = (n_layers, fan_out, fan_in)
        shapes[next(names)] = (n_layers, fan_out)
    return shapes


def check_scorer(kind, field: str = "kind") -> None:
    """ValueError naming `field` unless `kind` is a scorer class instance."""
    if not isinstance(kind, (LinearScorer, MLPScorer)):
        raise ValueError(f"{field}={kind!r} must be kvjax.kvzap.LinearScorer() or "
                         "MLPScorer(hidden_dim=...)")


def _frozen(x) -> np.ndarray:
    a = np.array(x, dtype=np.float32, copy=True)
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class KVzapWeights:
    """Trained KVzap scorer weights for one model (hashable by content: a static jit argument).

    Attributes:
      kind: `LinearScorer()` or `MLPScorer(hidden_dim)`.
      arrays: float32 numpy arrays in `kind.names` order (module docstring).
      info: JSON text describing where the weights come from (model, corpus, seed, held-out
        rank correlation, the command); not part of equality.
    """

    kind: Scorer
    arrays: tuple
    info: str = "{}"

    def __post_init__(self):
        check_scorer(self.kind)
        names = self.kind.names
        if len(self.arrays) != len(names):
            raise ValueError(f"a {self.kind.name} KVzap scorer has {len(names)} arrays "
                             f"{names}, got {len(self.arrays)}")
        arrays = tuple(_frozen(a) for a in self.arrays)
        object.__setattr__(self, "arrays", arrays)
        shapes = tuple(a.shape for a in arrays)
        if not self.kind.shapes_ok(shapes):
            raise ValueError(f"inconsistent {self.kind} KVzap arrays {dict(zip(names, shapes))}")
        json.loads(self.info)  # must be valid JSON
        digest = hashlib.sha256(self.kind.name.encode())
        for a in arrays:
            digest.update(str(a.shape).encode() + a.tobytes())
        object.__setattr__(self, "_digest", digest.hexdigest())

    # ---- identity -----------------------------------------------------------------------
    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, KVzapWeights) and self._digest == other._digest

    def __repr__(self):
        hidden = "" if self.hidden_dim is None else f", hidden_dim={self.hidden_dim}"
        return (f"KVzapWeights({self.kind.name}, (n_layers, d_model, n_kv_heads)="
                f"{self.signature}{hidden}, sha256={self._digest[:12]})")

    @property
    def sha256(self) -> str:
        return self._digest

    # ---- shapes -------------------------------------------------------------------------
    @property
    def signature(self) -> tuple[int, int, int]:
        """(n_layers, d_model, n_kv_heads) of the model these weights score."""
        first, last = self.arrays[0], self.arrays[-2]
        return (int(first.shape[0]), int(first.shape[2]), int(last.shape[1]))

    @property
    def hidden_dim(self) -> int | None:
        return getattr(self.kind, "hidden_dim", None)

    @property
    def metadata(self) -> dict:
        return json.loads(self.info)

    def check_model(self, n_layers: int, d_model: int, n_kv_heads: int) -> None:
        """Raise ValueError unless these weights were made for a model of these shapes."""
        got = (int(n_layers), int(d_model), int(n_kv_heads))
        if got != self.signature:
            model = self.metadata.get("model", "another model")
            raise ValueError(
                f"KVzap weights are for a model with (n_layers, d_model, n_kv_heads) = "
                f"{self.signature} ({model}), this model has {got}: train weights for it "
                "with `kvjax train-scorer --model ... --out DIR` and pass weights=DIR")

    def resolve(self, n_layers: int, d_model: int, n_kv_heads: int) -> "KVzapWeights":
        """These weights, checked against the model's shapes (what KVzapPress calls)."""
        self.check_model(n_layers, d_model, n_kv_heads)
        return self

    # ---- the scorer ---------------------------------------------------------------------
    def apply(self, hidden: jax.Array, layer) -> jax.Array:
        """Scores [B, T, K] f32 of hidden states [B, T, D] at `layer` (int or traced int32)."""
        return apply_params(self.kind, tuple(jnp.asarray(a) for a in self.arrays),
                            hidden, layer)

    def params(self) -> dict:
        """{name: stacked array} (numpy), the pytree `apply_params` and training use."""
        return dict(zip(self.kind.names, self.arrays))

    # ---- conversions --------------------------------------------------------------------
    @classmethod
    def from_params(cls, kind: Scorer, params: dict, info: dict | None = None) -> "KVzapWeights":
        check_scorer(kind)
        return cls(kind, tuple(np.asarray(params[n]) for n in kind.names),
                   json.dumps(info or {}, sort_keys=True))

    @classmethod
    def from_kvpress_layers(cls, kind: Scorer, layers: list[dict],
                            info: dict | None = None) -> "KVzapWeights":
        """From per-layer dicts of torch-layout numpy arrays: linear {"w", "b"}, mlp
        {"w1", "b1", "w2", "b2"} (what tests/kvjax/kvpress_kvzip_ref.kvzap_press returns)."""
        return cls.from_params(kind, {n: np.stack([l[n] for l in layers])
                                      for n in kind.names}, info)

    @classmethod
    def from_state_dict(cls, state: dict, info: dict | None = None) -> "KVzapWeights":
        """From kvpress's `KVzapModel.state_dict()` (numpy or torch tensors): keys
        `layers.{i}.weight/bias` (linear) or `layers.{i}.{0,2}.weight/bias` (mlp)."""
        np_ = lambda t: t.detach().float().cpu().numpy() if hasattr(t, "detach") else t
        n = 1 + max(int(k.split(".")[1]) for k in state)
        if "layers.0.weight" in state:
            layers = [{"w": np_(state[f"layers.{i}.weight"]), "b": np_(state[f"layers.{i}.bias"])}
                      for i in range(n)]
            return cls.from_kvpress_layers(LinearScorer(), layers, info)
        layers = [{"w1": np_(state[f"layers.{i}.0.weight"]), "b1": np_(state[f"layers.{i}.0.bias"]),
                   "w2": np_(state[f"layers.{i}.2.weight"]), "b2": np_(state[f"layers.{i}.2.bias"])}
                  for i in range(n)]
        return cls.from_kvpress_layers(MLPScorer(int(layers[0]["w1"].shape[0])), layers, info)

    def state_dict(self) -> dict[str, np.ndarray]:
        """kvpress's `KVzapModel` state dict (numpy; `torch.from_numpy` each to load it)."""
        p = self.params()
        out = {}
        for i in range(self.signature[0]):
            if isinstance(self.kind, LinearScorer):
                out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = p["w"][i], p["b"][i]
            else:
                out[f"layers.{i}.0.weight"], out[f"layers.{i}.0.bias"] = p["w1"][i], p["b1"][i]
                out[f"layers.{i}.2.weight"], out[f"layers.{i}.2.bias"] = p["w2"][i], p["b2"][i]
        return out

    @classmethod
    def init(cls, kind: Scorer, n_layers: int, d_model: int, n_kv_heads: int, *,
             seed: int = 0) -> "KVzapWeights":
        """Untrained weights drawn as torch's nn.Linear draws them (U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) for weights and biases), from numpy's generator `seed`: what
        `train_scorer` starts from. They rank tokens by a random projection of the hidden
        state, not by anything KVzip-like."""
        check_scorer(kind)
        rng = np.random.default_rng(seed)
        draw = lambda shape, fan_in: rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
        params, fan_in = {}, None
        for name, shape in param_shapes(kind, n_layers, d_model, n_kv_heads).items():
            fan_in = shape[2] if len(shape) == 3 else fan_in  # a bias follows its weight
            params[name] = draw(shape, fan_in)
        return cls.from_params(kind, params, {"source": f"untrained, init seed {seed}"})

    # ---- files --------------------------------------------------------------------------
    def save_npz(self, path) -> Path:
        """One small file: the arrays (float32) + kind + info (no pickle)."""
        path = Path(path)
        np.savez(path, kind=np.array(self.kind.name), info=np.array(self.info),
                 version=np.array(FORMAT_VERSION), **self.params())
        return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")

    @classmethod
    def load_npz(cls, path) -> "KVzapWeights":
        with np.load(path, allow_pickle=False) as f:
            version = int(f["version"]) if "version" in f else None
            if version != FORMAT_VERSION:
                raise ValueError(f"KVzap weights file {str(path)!r} has format version "
                                 f"{version}, not {FORMAT_VERSION}")
            name = str(f["kind"])
            hidden = int(f["w1"].shape[1]) if name == "mlp" else None
            kind = scorer_named(name, hidden)
            return cls(kind, tuple(f[n] for n in kind.names), str(f["info"]))


def gelu_erf(x):
    """torch's nn.GELU() (exact, erf)."""
    return jax.nn.gelu(x, approximate=False)


def apply_params(kind: Scorer, params, hidden: jax.Array, layer) -> jax.Array:
    """The scorer on hidden [B, T, D] (any float dtype; computed in f32) at `layer` (an int or
    a traced int32 indexing the stacked arrays) -> [B, T, K] f32. `params` is a tuple in
    `kind.names` order or a dict."""
    if isinstance(params, dict):
        params = tuple(params[n] for n in kind.names)
    take = lambda a: jnp.asarray(a, jnp.float32)[layer]
    return kind.forward(tuple(take(a) for a in params), hidden.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class UntrainedWeights:
    """`KVzapWeights.init(kind, L, D, K, seed=)` for whatever model the press
    meets (shapes read at trace time).

    Not a KVzip approximation: a fixed random projection of the hidden state. It exists so
    shape-generic tests (the press registry's invariants over tiny random models) exercise
    the press's real code path; never a default. Real use: shipped or trained weights.
    """

    kind: Scorer = LinearScorer()
    seed: int = 0

    def __post_init__(self):
        check_scorer(self.kind)

    def resolve(self, n_layers: int, d_model: int, n_kv_heads: int) -> KVzapWeights:
        return _init_cached(self.kind, int(n_layers), int(d_model), int(n_kv_heads), self.seed)


@functools.lru_cache(maxsize=16)
def _init_cached(kind, n_layers, d_model, n_kv_heads, seed):
    return KVzapWeights.init(kind, n_layers, d_model, n_kv_heads, seed=seed)


@dataclasses.dataclass(frozen=True)
class ShippedWeights:
    """The shipped weights that fit the model the press meets, matched by its shapes
    (n_layers, d_model, n_kv_heads) at trace time: KVzapPress's default. A model no shipped
    weights fit is a ValueError naming its shapes and how to train weights for it.
    `kvzip_plus=True` takes the shipped weights trained on KVzip+ scores instead."""

    kvzip_plus: bool = False

    def resolve(self, n_layers: int, d_model: int, n_kv_heads: int) -> KVzapWeights:
        got = (int(n_layers), int(d_model), int(n_kv_heads))
        for name in sorted(SHIPPED):
            weights = _shipped_cached(name)
            plus = bool(weights.metadata.get("config", {}).get("kvzip_plus", False))
            if weights.signature == got and plus == self.kvzip_plus:
                return weights
        have = ", ".join(f"{n} {_shipped_cached(n).signature}" for n in sorted(SHIPPED))
        raise ValueError(
            f"no shipped KVzap weights fit this model ((n_layers, d_model, n_kv_heads) = "
            f"{got}; shipped: {have}): train weights with `kvjax train-scorer --model ... "
            "--out DIR` and pass KVzapPress(weights=DIR)")


@functools.lru_cache(maxsize=4)
def _shipped_cached(name: str) -> KVzapWeights:
    return shipped_weights(name)


def shipped_weights(name: str = "smollm2") -> KVzapWeights:
    """The KVzap weights shipped inside kvjax (SmolLM2-135M-Instruct, linear)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped KVzap weights named {name!r}; shipped: {sorted(SHIPPED)}")
    with importlib.resources.as_file(
            importlib.resources.files("kvjax.kvzap").joinpath(SHIPPED[name])) as path:
        return KVzapWeights.load_npz(path)


def load_weights(source) -> KVzapWeights | UntrainedWeights:
    """KVzap weights from a `KVzapWeights` / `UntrainedWeights` (passed through), a shipped
    name ("smollm2"), a directory written by `kvjax train-scorer --out DIR` (its orbax
    checkpoint) or a `.npz` file (`KVzapWeights.save_npz`, the shipped format)."""
    if source is None:
        return ShippedWeights()
    if isinstance(source, (KVzapWeights, UntrainedWeights, ShippedWeights)):
        return source
    if not isinstance(source, (str, Path)):
        raise ValueError(f"weights={source!r}: expected KVzapWeights, 'smollm2', a directory "
                         "written by `kvjax train-scorer` or a .npz file")
    if str(source) in SHIPPED:
        return shipped_weights(str(source))
    path = Path(source)
    if path.is_dir():
        return load_dir(path)
    if path.is_file():
        return KVzapWeights.load_npz(path)
    raise FileNotFoundError(f"KVzap weights {str(source)!r}: no such file or directory (and "
                            f"not a shipped name: {sorted(SHIPPED)})")


def save_dir(weights: KVzapWeights, path, metrics: dict | None = None) -> Path:
    """Write `path/checkpoint` (orbax, the parameter pytree), `path/kvzap.json` (kind,
    shapes, info, metrics) and `path/kvzap.npz` (the same weights as one small file)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if (path / CHECKPOINT_DIR).exists():
        raise FileExistsError(f"{str(path / CHECKPOINT_DIR)!r} exists")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / CHECKPOINT_DIR, {k: np.asarray(v) for k, v in weights.params().items()})
    meta = {"format_version": FORMAT_VERSION, "kind": weights.kind.name,
            "signature": list(weights.signature), "hidden_dim": weights.hidden_dim,
            "sha256": weights.sha256, "info": weights.metadata, "metrics": metrics or {}}
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    weights.save_npz(path / NPZ_FILE)
    return path


def load_dir(path) -> KVzapWeights:
    """Weights from a directory written by `save_dir` (restored from its orbax checkpoint)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if not (path / META_FILE).is_file():
        raise ValueError(f"{str(path)!r} is not a KVzap weights directory (no {META_FILE}; "
                         "write one with `kvjax train-scorer --out DIR`)")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has KVzap format version "
                         f"{meta.get('format_version')}, not {FORMAT_VERSION}")
    kind = scorer_named(meta["kind"], meta.get("hidden_dim"))
    shapes = param_shapes(kind, *meta["signature"])
    target = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / CHECKPOINT_DIR, target)
    out = KVzapWeights.from_params(kind, {k: np.asarray(v) for k, v in params.items()},
                                   meta.get("info", {}))
    if meta.get("sha256") and out.sha256 != meta["sha256"]:
        raise ValueError(f"{str(path)!r}: restored weights do not match the recorded sha256")
    return out
