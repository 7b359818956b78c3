"""Perplexity of long text with a compressed cache.

The first N tokens are prefilled and compressed by a press; the next M tokens are scored
teacher-forced, fed through the cache in chunks with `fn.decode`. The full-cache number comes
from the same code with press None, so the increase isolates the compression.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops
from kvjax.eval.engine import group_by_spec
from kvjax.plan import plan_request
from kvjax.corpus import corpus_paragraphs
from kvjax.eval.tasks import sample_rng
from kvjax.memory import memory_report

PERPLEXITY = "perplexity"


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """nll: [M] negative log-likelihoods (nats) of the scored tokens; cache bytes after prefill."""

    nll: np.ndarray
    kv_bytes_needed: int
    bytes_held: int

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


def continuation_nll(fn, params, last_logits, cache, continuation: Sequence[int], *,
                     chunk: int = 64, attn_impl: str = "auto") -> np.ndarray:
    """NLL [M] of `continuation` given the prefilled cache and its last logits [1, V].

    Token 0 is scored by the prefill's logits; tokens 1..M-1 by feeding 0..M-2 in chunks of
    `chunk` (the last chunk right-padded, so one compilation serves every chunk).
    """
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
        out.append(np.asarray(nll)[0, :n])
    return np.concatenate(out)


def perplexities(fn, params, ids: Sequence[int], n_context: int, n_score: int,
                 presses: Sequence, *, chunk: int = 64,
                 attn_impl: str = "auto", quant=None) -> list[PerplexityResult]:
    """Score ids[n_context:n_context + n_score] after compressing ids[:n_context] by each press.

    Args:
      fn, params: `model.kvjax_split()`.
      ids: [>= n_context + n_score] token ids of one text.
      presses: kvjax presses or None (full cache); equal obs specs share one prefill.
      quant: a `kvjax.quant.KVQuant` to score over a quantized store, or None.
    """
    if n_context < 1 or n_score < 2:
        raise ValueError(f"{n_context=} must be >= 1 and {n_score=} >= 2")
    if len(ids) < n_context + n_score:
        raise ValueError(f"{len(ids)=} < {n_context=} + {n_score=}")
    # teacher forcing needs no decode hook: the scored tokens go to the tail, in chunks
    plans = [dataclasses.replace(
        plan_request(fn, [list(ids[:n_context])], max_new_tokens=0, press=p, kv_dtype=quant,
                     tail_extra=n_score, attn_impl=attn_impl),
        hook=None, tail_capacity=loops.bucket_length(n_score + chunk)) for p in presses]
    tokens, lengths = jnp.asarray(plans[0].tokens), jnp.asarray(plans[0].lengths)
    attn_impl = plans[0].attn_impl
    results: list[PerplexityResult | None] = [None] * len(presses)
    for group in group_by_spec(presses, with_hook=False):
        logits, prompt = loops.prefill_prompt(fn, params, tokens, lengths, attn_impl=attn_impl,
                                              **plans[group[0]].prefill_parts())
        for i in group:
            compressed = loops.compress_prompt(plans[i].press, prompt, plans[i])
            report = memory_report(compressed)
            nll = continuation_nll(fn, params, logits, compressed,
                                   ids[n_context:n_context + n_score], chunk=chunk,
                                   attn_impl=attn_impl)
            results[i] = PerplexityResult(nll, int(report.kv_bytes_needed),
                                          int(report.bytes_held))
    return results


def corpus_ids(tokenizer, n_tokens: int, seed: int = 0, index: int = 0) -> list[int]:
    """n_tokens ids of shipped-corpus paragraphs in a seeded order (no paragraph repeats)."""
    paragraphs = corpus_paragraphs()
    order = sample_rng(seed, PERPLEXITY, index).permutation(len(paragraphs))
    ids = tokenizer.encode(" ".join(paragraphs[i] for i in order), add_bos=False)
    if len(ids) < n_tokens:
        raise ValueError(f"{n_tokens=} exceeds the corpus ({len(ids)} tokens)")
    return ids[:n_tokens]
