"""UNComp calibration files: kv-head entropy groups per layer and layer stages.

`UNCompCalibration` is what `kvjax.presses.uncomp.UNCompPress` reads: per layer, the kv-head
groups (low entropy first) and their mean entropies, the layer-entropy profile and the stages
it splits into. The file is small, versioned JSON; SmolLM2-135M-Instruct's ships with kvjax.
`kvjax.tools.uncomp_calibrate.calibrate` measures one for a model (`kvjax uncomp-calibrate`).
"""

import dataclasses
import importlib.resources
import json
import math
from pathlib import Path

VERSION = 1
SHIPPED = {"smollm2": "smollm2_135m.json"}
DEFAULT_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class UNCompCalibration:
    """What UNComp needs to know about one model (hashable: a static jit argument).

    Attributes:
      version: file format version.
      model_signature: (n_layers, n_heads, n_kv_heads, head_dim).
      head_groups: per layer, per group (low -> high entropy) the sorted kv-head ids; every
        layer's groups partition range(n_kv_heads).
      head_entropy: per layer, the mean H_k of every kv head (over its query heads, prompts).
      layer_entropy: per layer, the mean H_k of its output hidden states.
      stages: first layer of every stage (starts with 0).
      k: truncation; threshold: the stage-split drop; source: prompts used; prompt_sha256:
        hash of the calibration token ids (reproducibility check).
    """

    version: int
    model_signature: tuple[int, int, int, int]
    head_groups: tuple[tuple[tuple[int, ...], ...], ...]
    head_entropy: tuple[tuple[float, ...], ...]
    layer_entropy: tuple[float, ...]
    stages: tuple[int, ...]
    k: int = 32
    threshold: float = DEFAULT_THRESHOLD
    source: str = ""
    prompt_sha256: str = ""

    def __post_init__(self):
        n_layers, _, n_kv, _ = self.model_signature
        if len(self.head_groups) != n_layers or len(self.layer_entropy) != n_layers:
            raise ValueError(f"calibration has {len(self.head_groups)} layers of head groups "
                             f"for a {n_layers}-layer signature")
        for li, groups in enumerate(self.head_groups):
            ids = sorted(h for g in groups for h in g)
            if ids != list(range(n_kv)) or any(len(g) == 0 for g in groups):
                raise ValueError(f"layer {li}: head groups {groups} are not a partition of "
                                 f"{n_kv} kv heads into non-empty groups")
        if not self.stages or self.stages[0] != 0 or list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"stages {self.stages} must be ascending and start at layer 0")

    @property
    def n_groups(self) -> int:
        return len(self.head_groups[0])

    def check_model(self, n_layers: int, n_heads: int | None, n_kv_heads: int,
                    head_dim: int | None = None) -> None:
        """Raise ValueError unless this calibration was made for a model of these shapes."""
        want = self.model_signature
        got = (n_layers, n_heads, n_kv_heads, head_dim)
        if any(g is not None and g != w for g, w in zip(got, want)):
            raise ValueError(f"UNComp calibration is for a model with (n_layers, n_heads, "
                             f"n_kv_heads, head_dim) = {want}, not {got}")

    def group_of_heads(self, layer: int) -> tuple[int, ...]:
        """Group index (0 = lowest entropy) of every kv head of `layer`."""
        out = [0] * self.model_signature[2]
        for g, heads in enumerate(self.head_groups[layer]):
            for h in heads:
                out[h] = g
        return tuple(out)

    def prefill_keep(self, n_tokens: int, min_keep_ratio: float = 0.375,
                     window: int = 8) -> tuple[int | None, ...]:
        """Hidden-state pruning schedule for `UNCompPress(prefill_keep=...)`.

        Stage s of S keeps `min_len + ((n - min_len) // (S - 1)) * (S - 1 - s)` tokens
        (official code, with max_tokens = n the padded prompt length and min_len =
        ceil(min_keep_ratio * n), official 1536 / 4096); stage 0 keeps everything.
        """
        if not 0.0 < min_keep_ratio <= 1.0:
            raise ValueError(f"{min_keep_ratio=} must be in (0, 1]")
        keep = [None] * self.model_signature[0]
        n_stages = len(self.stages)
        min_len = max(window, math.ceil(min_keep_ratio * n_tokens))
        for s, first in enumerate(self.stages[1:], start=1):
            step = (n_tokens - min_len) // (n_stages - 1)
            keep[first] = min(n_tokens, min_len + step * (n_stages - 1 - s))
        return tuple(keep)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "UNCompCalibration":
        d = json.loads(text)
        if d.get("version") != VERSION:
            raise ValueError(f"UNComp calibration version {d.get('version')} is not {VERSION}")
        d["model_signature"] = tuple(d["model_signature"])
        d["head_groups"] = tuple(tuple(tuple(g) for g in layer) for layer in d["head_groups"])
        d["head_entropy"] = tuple(tuple(x) for x in d["head_entropy"])
        d["layer_entropy"], d["stages"] = tuple(d["layer_entropy"]), tuple(d["stages"])
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def load_calibration(source) -> UNCompCalibration:
    """A calibration from a JSON path, a shipped name ("smollm2"), or pass one through."""
    if isinstance(source, UNCompCalibration):
        return source
    if str(source) in SHIPPED:
        return shipped_calibration(str(source))
    return UNCompCalibration.from_json(Path(source).read_text())


def shipped_calibration(name: str = "smollm2") -> UNCompCalibration:
    """The calibration shipped inside kvjax (SmolLM2-135M-Instruct)."""
    text = importlib.resources.files("kvjax.uncomp").joinpath(SHIPPED[name]).read_text()
    return UNCompCalibration.from_json(text)


