"""KVzapPress: a learned approximation of KVzip's scores from hidden states (Jegou et al.,
KVzap, arXiv 2601.07891), as kvpress 0.5.5's KVzapPress applies it (docs/kvzip_reference.md
section 3)."""

import dataclasses

import jax.numpy as jnp

from kvjax.kvzap.weights import KVzapWeights, ShippedWeights, UntrainedWeights, load_weights
from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress
from kvjax.presses.kvzip import GlobalTopK

ALLOCATIONS = ("global", "layer", "uniform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVzapPress(ScorerPress):
    """KVzap: a small per-layer model (linear D -> K, or a two-layer MLP D -> F -> K with an
    exact GELU) maps every prompt token's attention input (the layer's hidden state after
    input_layernorm, `Observation.hidden`) to one score per kv head, trained to predict the
    log of the token's KVzip score.

    Which entries survive (`allocation`):
      "global" (default): KVzip's allocation, one top-k over every layer's and kv head's
        predicted scores (`kvjax.presses.kvzip.GlobalTopK`), the first `n_sink` positions
        kept. The scores are log-KVzip predictions on one scale across layers, which is
        what a global budget needs; the KVzap paper prunes with one threshold over all
        heads, also a global criterion.
      "layer": one top-k per layer over its kv heads.
      "uniform": top-ceil((1 - r) n) per kv head like every ScorerPress; with `n_sink=0` the
        selection equals kvpress 0.5.5's KVzapPress given the same weights (kvpress keeps
        int(n (1 - r))).
    On SmolLM2 (needle samples, question-agnostic, r = 0.5 and 0.75) "uniform" loses every
    needle and "global" keeps it: docs/presses.md, KVzap.

    Scoring costs L * T * D * K multiply-adds for the linear scorer (SmolLM2: 30 x 576 x 3 per
    token), a small fraction of the prefill, instead of KVzip's two extra prefills.

    Attributes:
      weights: None (the default: the shipped weights that fit the model, matched at trace
        time by its (n_layers, d_model, n_kv_heads), `kvjax.kvzap.ShippedWeights`; a model
        none fit is a ValueError naming its shapes), "smollm2" (the shipped linear weights
        for SmolLM2-135M-Instruct), a directory
        written by `kvjax train-scorer --out DIR`, a `.npz` file (`KVzapWeights.save_npz`), a
        `kvjax.kvzap.KVzapWeights`, or a `kvjax.kvzap.UntrainedWeights` (a random projection,
        for tests only). Weights made for another model are a ValueError at trace time naming
        both (n_layers, d_model, n_kv_heads).
    """

    score_scale = "log"

    weights: KVzapWeights | UntrainedWeights | ShippedWeights | str | None = None
    allocation: str = "global"
    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"{self.allocation=} must be one of {ALLOCATIONS}")
        if self.n_sink < 0:
            raise ValueError(f"{self.n_sink=} must be >= 0")
        object.__setattr__(self, "weights", load_weights(self.weights))

    @property
    def obs_spec(self):
        return ObsSpec(hidden=True)

    def score(self, prefix, obs, ctx):
        if obs.hidden is None:
            raise ValueError("KVzapPress needs every layer's attention input: prefill with "
                             "the press's obs_spec (ObsSpec(hidden=True)) and pass hidden= "
                             "to kvjax.prefill_layer")
        weights = self.weights.resolve(ctx.n_layers, obs.hidden.shape[-1], prefix.k.shape[1])
        s = weights.apply(obs.hidden, ctx.layer_idx).transpose(0, 2, 1)  # [B, K, T]
        s = jnp.take_along_axis(s, prefix.pos, axis=2)
        return jnp.where(prefix.pos < self.n_sink, jnp.inf, s)

    def allocator(self):
        if self.allocation == "uniform":
            return super().allocator()
        return GlobalTopK(self.compression_ratio, layerwise=self.allocation == "layer")
