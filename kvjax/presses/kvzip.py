"""KVzipPress: query-agnostic eviction by context reconstruction (Kim et al. 2025,
arXiv 2505.23416), as kvpress 0.5.5 defines it (docs/kvzip_reference.md)."""

import dataclasses

import jax.numpy as jnp

from kvjax.kvzip import RepeatPass, RepeatPrompt, check_context
from kvjax.presses import select
from kvjax.presses.base import Press
from kvjax.presses.parts import Allocator, Stage, StaticSize, TopK


@dataclasses.dataclass(frozen=True)
class RepeatScores:
    """Scorer: the repeat pass's scores (`Observation.token_scores`); the first `n_sink`
    positions above everything."""

    n_sink: int = 4

    def score(self, prefix, obs, ctx):
        if obs.token_scores is None:
            raise ValueError("KVzip scores are missing: prefill with the press's prompt "
                             "observer (kvjax.generate, Pipeline and kvjax eval run it)")
        s = jnp.take_along_axis(obs.token_scores, prefix.pos, axis=2)
        return jnp.where(prefix.pos < self.n_sink, jnp.inf, s)


@dataclasses.dataclass(frozen=True)
class GlobalTopK(Allocator):
    """Budgets from one top-k over every layer's and kv head's scores (kvpress's KVzip):
    a sequence keeps ceil((1 - r) L K T) entries and each (layer, head) keeps what the top-k
    gave it. `layerwise`: one top-k per layer over its kv heads (each layer keeps
    ceil((1 - r) K T))."""

    compression_ratio: float
    layerwise: bool = False

    def layer_stat(self, view, obs, scores, ctx):
        return scores  # [B, K, C], -inf on invalid slots

    def budgets(self, n_valid, stats, prompt_len):
        n_layers, b, n_kv, c = stats.shape
        scores = stats.transpose(1, 0, 2, 3)  # [B, L, K, C]
        if self.layerwise:
            flat = scores.reshape(b, n_layers, n_kv * c)
            keep = select.ceil_keep(n_valid.sum(-1), self.compression_ratio)  # [B, L]
        else:
            flat = scores.reshape(b, 1, n_layers * n_kv * c)
            keep = select.ceil_keep(n_valid.sum((1, 2)), self.compression_ratio)[:, None]
        mask = select.topk_mask(flat, keep, flat.shape[-1])
        return mask.reshape(b, n_layers, n_kv, c).sum(-1).astype(jnp.int32)

    def capacity(self, size, n_kv):
        # any (layer, head) may keep its whole segment; the total shrinks with the ratio
        per_layer = [n_kv * s for s in size.segments]
        if self.layerwise:
            total = sum(select.ceil_keep_static(x, self.compression_ratio) for x in per_layer)
        else:
            total = select.ceil_keep_static(sum(per_layer), self.compression_ratio)
        return StaticSize(size.segments, min(size.total, total))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVzipPress(Press):
    """KVzip (Kim et al. 2025, arXiv 2505.23416), kvpress 0.5.5's variant.

    After the prefill the model is prompted to repeat the context (chunks of `chunk_size`
    tokens, the chat template around the instruction) over the full cache
    (`kvjax.kvzip.RepeatPass`, inside the jitted prefill); a token's score is the largest
    softmax probability a repeat query gives it (max over the query heads of its kv group),
    the first `n_sink` positions are always kept, and one top-k over all layers and kv heads
    decides the budgets (`GlobalTopK`; `layerwise=True`: per layer). The repeat tokens are
    dropped. Costs about two prefills on top of the prefill. The instruction's token ids come
    from the tokenizer: `repeat=RepeatPrompt.from_tokenizer(tok)`, or leave it None and run
    the press through `kvjax.Pipeline` / `kvjax eval` / the CLI, which bind the tokenizer
    (`with_tokenizer`). A tokenizer without a chat template gets the plain prompt; a context
    shorter than a chunk is repeated whole.

    `kvzip_plus_normalization=True` gives KVzip+ (the KVzap paper's score, kvpress's option of
    the same name): each repeat row's attention is divided by the norm of its attention input
    and each entry's weighed by ||W_O v|| per query head, what it writes to the residual
    stream. The model passes `out_proj=` to `kvjax.decode_layer` (kvjax's own models do).
    """

    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    kvzip_plus_normalization: bool = False
    repeat: RepeatPrompt | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"{self.n_sink=} must be >= 0")
        if self.chunk_size < 1:
            raise ValueError(f"{self.chunk_size=} must be >= 1")
        if self.repeat is not None and not isinstance(self.repeat, RepeatPrompt):
            raise ValueError(f"repeat={self.repeat!r} is not a kvjax.kvzip.RepeatPrompt")

    def with_tokenizer(self, tokenizer) -> "KVzipPress":
        if self.repeat is not None:
            return self
        return dataclasses.replace(self, repeat=RepeatPrompt.from_tokenizer(tokenizer))

    def check_prompt(self, min_prompt_len):
        check_context(min_prompt_len, self._repeat())

    def _repeat(self) -> RepeatPrompt:
        if self.repeat is None:
            raise ValueError("KVzipPress needs the repeat instruction's token ids: "
                             "KVzipPress(..., repeat=kvjax.RepeatPrompt.from_tokenizer(tok)), "
                             "or run it through kvjax.Pipeline / kvjax eval")
        return self.repeat

    @property
    def prompt_observer(self):
        if self.compression_ratio == 0:
            return None
        return RepeatPass(repeat=self._repeat(), chunk_size=self.chunk_size,
                          n_sink=self.n_sink, plus=self.kvzip_plus_normalization)

    def stages(self):
        if self.compression_ratio == 0:
            return ()
        return (Stage(scorer=RepeatScores(n_sink=self.n_sink),
                      allocator=GlobalTopK(self.compression_ratio, self.layerwise),
                      selector=TopK()),)
