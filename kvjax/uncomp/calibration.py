"""UNComp offline calibration: kv-head entropy groups per layer and layer stages.

`calibrate` runs calibration prompts through the model once each and measures, per layer,
  * the truncated matrix entropy H_k of every query head's post-RoPE queries Q_h [T, H]
    (k = 32 by default, UNComp's "svd32"), aggregated per kv head (mean over its query heads),
    so whole kv heads are grouped and the memory saving is real under GQA;
  * the truncated entropy H_k of the layer's output hidden states [T, D] (the layer profile).
Head groups come from a vote over prompts (the official `head_type_search_2`, generalised to n
groups): in every prompt the kv heads are sorted by entropy and bucketed into n near-equal
groups; a head's vote is the sum of its bucket indices over prompts; heads sorted by
(vote, mean entropy, id) and bucketed again give the groups, low entropy first.
Stages: a new stage starts at layer l when layer_entropy[l] < layer_entropy[l-1] - threshold.
The result is a small versioned JSON file; SmolLM2-135M-Instruct's ships with kvjax.
"""

import dataclasses
import hashlib
import importlib.resources
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.observation import ObsSpec
from kvjax.uncomp.entropy import truncated_entropy

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


def calibration_prompts(tokenizer, n_prompts: int = 8, n_tokens: int = 512) -> list[list[int]]:
    """Deterministic calibration prompts of exactly `n_tokens` ids from the offline corpus.

    Prompt i is the eval suite's shipped essay corpus (`kvjax.eval`) read from paragraph i
    on (wrapping around), BOS first; nothing is downloaded.
    """
    from kvjax.eval.haystack import corpus_paragraphs
    paras = corpus_paragraphs()
    prompts = []
    for i in range(n_prompts):
        j = i % len(paras)
        text = " ".join(paras[j:] + paras[:j])
        ids = tokenizer.encode(text)
        while len(ids) < n_tokens:
            ids = ids + tokenizer.encode(" " + text, add_bos=False)
        prompts.append([int(t) for t in ids[:n_tokens]])
    return prompts


def prompt_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def _measure(fn, k):
    """Jitted (params, tokens [1, T]) -> (query H_k [L, N], hidden H_k [L])."""
    def run(params, tokens):
        t = tokens.shape[1]
        lengths = jnp.array([t], jnp.int32)
        _, prompt, hidden = fn.prefill(params, tokens, lengths, obs_spec=ObsSpec(window=t),
                                       attn_impl="reference", return_hidden=True)
        q = prompt.groups[0].layers.obs.q_window[:, 0]  # [L, T, N, H]
        q_ent = truncated_entropy(q.transpose(0, 2, 1, 3), k)  # [L, N]
        h_ent = truncated_entropy(jnp.stack([x[0] for x in hidden]), k)  # [L]
        return q_ent, h_ent
    return jax.jit(run)


def vote_groups(entropy: np.ndarray, n_groups: int) -> tuple[tuple[int, ...], ...]:
    """Head groups (low -> high) from per-prompt kv-head entropies [S, K] (see module doc)."""
    s, n_kv = entropy.shape
    if not 1 <= n_groups <= n_kv:
        raise ValueError(f"{n_groups=} groups cannot be formed from {n_kv} kv heads (a group "
                         "would be empty)")
    bucket = np.zeros(n_kv, np.int64)
    for b, part in enumerate(np.array_split(np.arange(n_kv), n_groups)):
        bucket[part] = b
    votes = np.zeros(n_kv, np.int64)
    for row in entropy:
        order = np.lexsort((np.arange(n_kv), row))  # ascending entropy, ties by id
        votes[order] += bucket
    final = np.lexsort((np.arange(n_kv), entropy.mean(0), votes))
    return tuple(tuple(sorted(int(h) for h in part))
                 for part in np.array_split(final, n_groups))


def split_stages(profile, threshold: float) -> tuple[int, ...]:
    """First layer of every stage: a new one where the profile drops by more than threshold."""
    return (0,) + tuple(l for l in range(1, len(profile))
                        if profile[l] < profile[l - 1] - threshold)


def calibrate(model, tokenizer, prompts=None, *, k: int = 32, groups: int = 2,
              threshold: float = DEFAULT_THRESHOLD, n_prompts: int = 8, n_tokens: int = 512,
              progress: bool = True) -> UNCompCalibration:
    """Calibrate UNComp for `model` (a `models.Decoder`-like object with `kvjax_split`).

    Args:
      prompts: token-id lists (equal lengths compile once); default `calibration_prompts`.
      k: truncation of the matrix entropy (<= head_dim); groups: number of head groups.
      threshold: entropy drop that starts a new layer stage.
    """
    cfg = model.config
    if k > cfg.head_dim:
        raise ValueError(f"truncation k={k} exceeds head_dim={cfg.head_dim}")
    if not 1 <= groups <= cfg.n_kv_heads:
        raise ValueError(f"{groups=} groups cannot be formed from {cfg.n_kv_heads} kv heads "
                         "(a group would be empty)")
    source = "custom prompts"
    if prompts is None:
        prompts = calibration_prompts(tokenizer, n_prompts, n_tokens)
        source = f"kvjax.eval corpus, {n_prompts} prompts x {n_tokens} tokens"
    fn, params = model.kvjax_split()
    measure = _measure(fn, k)
    q_ents, h_ents = [], []
    from tqdm.auto import tqdm
    for p in tqdm(prompts, desc="UNComp calibration", disable=not progress):
        q_ent, h_ent = measure(params, jnp.asarray([p], jnp.int32))
        q_ents.append(np.asarray(q_ent, np.float64))
        h_ents.append(np.asarray(h_ent, np.float64))
    g = cfg.n_heads // cfg.n_kv_heads
    kv_ent = np.stack(q_ents).reshape(len(prompts), cfg.n_layers, cfg.n_kv_heads, g).mean(-1)
    layer_entropy = np.stack(h_ents).mean(0)
    return UNCompCalibration(
        version=VERSION,
        model_signature=(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
        head_groups=tuple(vote_groups(kv_ent[:, l], groups) for l in range(cfg.n_layers)),
        head_entropy=tuple(tuple(round(float(x), 6) for x in kv_ent[:, l].mean(0))
                           for l in range(cfg.n_layers)),
        layer_entropy=tuple(round(float(x), 6) for x in layer_entropy),
        stages=split_stages(layer_entropy, threshold), k=k, threshold=threshold,
        source=source, prompt_sha256=prompt_hash(prompts))
