"""Perplexity of long text with a compressed cache.

The first N tokens are prefilled and compressed by a press; the next M tokens are scored
teacher-forced, fed through the cache in chunks with `fn.decode`. The full-cache number comes
from the same code with press None, so the increase isolates the compression. With a decode
hook (`kvjax.DecodingPress`) the chunk is its `compression_interval` and the hook merges after
every chunk, as it would after as many generated tokens (the long-generation task).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops
from kvjax.plan import plan_request
from kvjax.corpus import corpus_paragraphs
from kvjax.eval.tasks import sample_rng
from kvjax.memory import memory_report

PERPLEXITY = "perplexity"
LONG_GENERATION = "long_generation"  # perplexity with compression while the tokens arrive
PERPLEXITY_TASKS = (PERPLEXITY, LONG_GENERATION)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """nll: [M] negative log-likelihoods (nats) of the scored tokens; cache bytes after prefill;
    kept_share: entries the cache holds after the last token over the entries of every token
    it has seen (prompt and scored, over layers and kv heads): 1.0 for the full cache."""

    nll: np.ndarray
    kv_bytes_needed: int
    bytes_held: int
    kept_share: float = 1.0

    @property
    def mean_nll(self) -> float:
        return float(np.mean(self.nll))

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@functools.partial(jax.jit, static_argnames=("fn", "attn_impl"), donate_argnames=("cache",))
def score_chunk(fn, params, tokens, targets, n_new, cache, *, attn_impl):
    """Feed tokens [B, C] (n_new [B] real) -> (nll of targets [B, C] f32, cache)."""
    logits, cache = fn.decode(params, tokens, n_new, cache, attn_impl=attn_impl)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def merge_when_due(cache):
    """The cache after its decode hook's `after_step` (a DecodingPress merges a full tail)."""
    return cache.hook.after_step(cache)


def scoring_chunk(cache, chunk: int) -> int:
    """The chunk size to feed `cache`: `chunk`, or its DecodingPress's interval (the tail
    holds one interval). ValueError for a hook that cannot take chunks."""
    hook = cache.hook
    if hook is None:
        return chunk
    interval = getattr(hook, "compression_interval", None)
    if interval is None:
        raise ValueError(f"{type(hook).__name__} re-selects every token; teacher-forced chunks "
                         "need a hook that merges every compression_interval tokens "
                         "(kvjax.DecodingPress)")
    return interval


def continuation_nll(fn, params, last_logits, cache, continuation: Sequence[int], *,
                     chunk: int = 64, attn_impl: str = "auto", final: list | None = None
                     ) -> np.ndarray:
    """NLL [M] of `continuation` given the prefilled cache and its last logits [1, V].

    Token 0 is scored by the prefill's logits; tokens 1..M-1 by feeding 0..M-2 in chunks of
    `chunk` (the last chunk right-padded, so one compilation serves every chunk). A cache with
    a DecodingPress is fed `compression_interval` tokens at a time and merged after each
    chunk. `final`, if given, receives the last cache.
    """
    chunk = scoring_chunk(cache, chunk)
    cont = np.asarray(continuation, np.int32)
    first = -jax.nn.log_softmax(last_logits[0].astype(jnp.float32))[cont[0]]
    out = [np.asarray(first)[None]]
    for start in range(0, len(cont) - 1, chunk):
        feed = cont[start:start + chunk]
        target = cont[start + 1:start + 1 + chunk]
        n = len(target)
        tok = np.zeros((1, chunk), np.int32)
        tgt = np.zeros((1, chunk), np.int32)
        tok[0, :n], tgt[0, :n] = feed[:n], target
        nll, cache = score_chunk(fn, params, jnp.asarray(tok), jnp.asarray(tgt),
                                 jnp.array([n], jnp.int32), cache, attn_impl=attn_impl)
        if cache.hook is not None:
            cache = merge_when_due(cache)
        out.append(np.asarray(nll)[0, :n])
    if final is not None:
        final.append(cache)
    return np.concatenate(out)


def perplexities(fn, params, ids: Sequence[int], n_context: int, n_score: int,
                 presses: Sequence, *, chunk: int = 64, attn_impl: str = "auto", quant=None,
                 hooks: Sequence | None = None) -> list[PerplexityResult]:
    """Score ids[n_context:n_context + n_score] after compressing ids[:n_context] by each press.

    Args:
      fn, params: `model.kvjax_split()`.
      ids: [>= n_context + n_score] token ids of one text.
      presses: kvjax presses or None (full cache); equal prefills are shared.
      quant: a `kvjax.quant.KVQuant` to score over a quantized store, or None.
      hooks: per press, a `kvjax.DecodingPress` that keeps compressing while the scored tokens
        arrive (one merge every `compression_interval`), or None; default: no hooks.
    """
    if n_context < 1 or n_score < 2:
        raise ValueError(f"{n_context=} must be >= 1 and {n_score=} >= 2")
    if len(ids) < n_context + n_score:
        raise ValueError(f"{len(ids)=} < {n_context=} + {n_score=}")
    hooks = [None] * len(presses) if hooks is None else list(hooks)
    if len(hooks) != len(presses):
        raise ValueError(f"{len(hooks)=} must equal {len(presses)=}")
    plans = [_plan(fn, ids[:n_context], n_score, p, h, quant, attn_impl, chunk)
             for p, h in zip(presses, hooks)]
    tokens, lengths = jnp.asarray(plans[0].tokens), jnp.asarray(plans[0].lengths)
    attn_impl = plans[0].attn_impl
    groups: dict = {}
    for i, plan in enumerate(plans):
        groups.setdefault(tuple(plan.prefill_parts().values()), []).append(i)
    results: list[PerplexityResult | None] = [None] * len(presses)
    for group in groups.values():
        logits, prompt = loops.prefill_prompt(fn, params, tokens, lengths, attn_impl=attn_impl,
                                              **plans[group[0]].prefill_parts())
        for i in group:
            compressed = loops.compress_prompt(plans[i].press, prompt, plans[i])
            report = memory_report(compressed)
            final: list = []
            nll = continuation_nll(fn, params, logits, compressed,
                                   ids[n_context:n_context + n_score], chunk=chunk,
                                   attn_impl=attn_impl, final=final)
            results[i] = PerplexityResult(nll, int(report.kv_bytes_needed),
                                          int(report.bytes_held), kept_share(final[0]))
    return results


def _plan(fn, context, n_score, press, hook, quant, attn_impl, chunk):
    """The plan of one perplexity cell: teacher forcing needs no decode hook unless one is
    asked for (then the tail holds one interval and the store the hook's room)."""
    if hook is not None:
        return plan_request(fn, [list(context)], max_new_tokens=n_score, press=press,
                            decoding_press=hook, kv_dtype=quant, attn_impl=attn_impl)
    plan = plan_request(fn, [list(context)], max_new_tokens=0, press=press, kv_dtype=quant,
                        tail_extra=n_score, attn_impl=attn_impl)
    return dataclasses.replace(plan, hook=None,
                               tail_capacity=loops.bucket_length(n_score + chunk))


def kept_share(cache) -> float:
    """Entries a cache holds (its segments' lengths plus the tail's count, over every layer
    and kv head) over those of every token it has seen (`next_pos`)."""
    heads = cache.n_layers * cache.store.n_kv_heads
    tail = int(np.asarray(cache.tail.count).sum()) * heads
    held = int(np.asarray(cache.store.length).sum()) + tail
    return held / (heads * int(np.asarray(cache.next_pos).sum()))


def corpus_ids(tokenizer, n_tokens: int, seed: int = 0, index: int = 0) -> list[int]:
    """n_tokens ids of shipped-corpus paragraphs in a seeded order (no paragraph repeats)."""
    paragraphs = corpus_paragraphs()
    order = sample_rng(seed, PERPLEXITY, index).permutation(len(paragraphs))
    ids = tokenizer.encode(" ".join(paragraphs[i] for i in order), add_bos=False)
    if len(ids) < n_tokens:
        raise ValueError(f"{n_tokens=} exceeds the corpus ({len(ids)} tokens)")
    return ids[:n_tokens]
