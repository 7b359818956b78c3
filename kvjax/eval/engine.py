"""Answer one sample under several presses, prefilling once per observation spec.

`Pipeline.run(context, question, press=p)` prefills and compresses in one jitted call. Here the
same steps are split: presses that need the same observations (`press.obs_spec`) share one
prefill of the context, then each press compresses its own copy of the cache, the question is
appended and the answer decoded exactly as `Pipeline.run` does. On a CPU where a 2k-token
prefill costs tens of seconds this makes a grid of presses and ratios several times cheaper;
tests check the answers equal `Pipeline.run`'s.
"""

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops
from kvjax.compress import compress, obs_spec_for
from kvjax.eval.sample import Sample
from kvjax.memory import memory_report
from kvjax.sampling import Greedy


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer and what it cost.

    Attributes:
      text: decoded answer; tokens: generated ids (EOS included when hit).
      kv_bytes_needed / bytes_held: `kvjax.memory_report` of the final cache (context,
        question and answer); context_kv_bytes: valid key/value bytes of the compressed
        context alone (what a press controls; comparable with kvpress's cache).
      n_context / n_question: prompt tokens compressed / appended after compression.
      prefill_s: wall seconds of the (shared) prefill; compress_s: this press's own work
        after it (its prompt observer, e.g. KVzip's repeat pass, and the compression);
      decode_s: question append + decode; error: why no answer was produced ("" if one was).
    """

    text: str
    tokens: tuple[int, ...]
    kv_bytes_needed: int
    bytes_held: int
    context_kv_bytes: int
    n_context: int
    n_question: int
    prefill_s: float
    decode_s: float
    compress_s: float = 0.0
    error: str = ""


def prefill_observe(fn, params, tokens, lengths, *, obs_spec, attn_impl, between=None,
                    observer=None):
    """Prefill without compressing -> (last logits [B, V], kvjax.prompt.Prompt)."""
    return loops.prefill_prompt(fn, params, tokens, lengths, obs_spec=obs_spec,
                                attn_impl=attn_impl, between=between, observer=observer)


@functools.partial(jax.jit, static_argnames=("press", "tail_capacity", "hook", "quant"))
def compress_copy(press, prompt, *, tail_capacity, hook=None, quant=None):
    """The prompt compressed by `press` into a new cache (the prompt's buffers survive, so
    other presses compress the same prefill); `hook`: the cache's decode hook; `quant`: a
    `kvjax.quant.KVQuant` for a quantized store."""
    return compress(press, prompt, tail_capacity=tail_capacity, hook=hook, quant=quant)


def prefill_parts(press) -> dict:
    """What a press needs from the shared prefill: between-layers hook and prompt observer."""
    if press is None:
        return dict(between=None, observer=None)
    return dict(between=press.between_layers, observer=press.prompt_observer)


def group_by_spec(presses: Sequence) -> list[list[int]]:
    """Indices of `presses` grouped by equal prefills (observation spec, between-layers hook,
    prompt observer), in first-seen order."""
    groups: dict = {}
    for i, press in enumerate(presses):
        key = (obs_spec_for(press), *prefill_parts(press).values())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def append_tokens(pipeline, state: loops.DecodeState, ids: Sequence[int]) -> loops.DecodeState:
    """Feed `ids` (the question) into the state's cache as `Pipeline` does before decoding."""
    return pipeline.append_tokens(state, ids)


def answer_sample(pipeline, sample: Sample, presses: Sequence, *,
                  question_aware: bool = False) -> list[Answer]:
    """Greedy answers of `sample` under each press (None = full cache), in order.

    Args:
      pipeline: a `kvjax.Pipeline` (its model, tokenizer and attention implementation).
      sample: the context, question, answer prefix and decode budget.
      presses: kvjax presses or None; presses with equal `obs_spec` share one prefill.
      question_aware: compress the context with the question in it.
    """
    fn, params = pipeline.fn, pipeline.params
    presses = [None if p is None else p.with_tokenizer(pipeline.tokenizer) for p in presses]
    ctx_ids, q_ids = pipeline.encode(sample.context, sample.question,
                                     answer_prefix=sample.answer_prefix,
                                     question_aware=question_aware)
    tokens, lengths = loops.pad_prompts([ctx_ids])
    loops.check_budget(fn, len(ctx_ids) + len(q_ids), sample.max_new_tokens)
    for press in presses:
        if press is not None:
            press.check_prompt(len(ctx_ids))
    out_len = loops.bucket_length(sample.max_new_tokens + len(q_ids))
    answers: list[Answer | None] = [None] * len(presses)
    for group in group_by_spec(presses):
        t0 = time.perf_counter()
        first = presses[group[0]]
        parts = prefill_parts(first)
        logits, prompt = prefill_observe(
            fn, params, jnp.asarray(tokens), jnp.asarray(lengths), obs_spec=obs_spec_for(first),
            attn_impl=pipeline.attn_impl, between=parts["between"])
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        if parts["observer"] is not None:  # e.g. KVzip's repeat pass: part of compression
            prompt = loops.observe_prompt(fn, params, jnp.asarray(tokens), prompt,
                                          observer=parts["observer"],
                                          attn_impl=pipeline.attn_impl)
            jax.block_until_ready(prompt)
        times = (t1 - t0, time.perf_counter() - t1)
        for i in group:
            answers[i] = _decode_one(pipeline, presses[i], logits, prompt, q_ids, out_len,
                                     sample.max_new_tokens, times, len(ctx_ids))
    return answers


def _decode_one(pipeline, press, logits, prompt, q_ids, out_len, max_new_tokens,
                times, n_context) -> Answer:
    """times: (the shared prefill's seconds, the press's prompt observer's seconds)."""
    t0 = time.perf_counter()
    cache = compress_copy(press, prompt, tail_capacity=out_len,
                          hook=None if press is None else press.decode_hook,
                          quant=pipeline.kv_quant)
    state = loops.init_state(logits, cache, 1, out_len, None)
    jax.block_until_ready(state.cache)
    t1 = time.perf_counter()
    context_kv_bytes = int(memory_report(state.cache).kv_bytes_needed)
    state = append_tokens(pipeline, state, q_ids)
    state = loops.decode(pipeline.fn, pipeline.params, state, jnp.int32(max_new_tokens),
                         loops.eos_array(pipeline.tokenizer.eos_ids), sampler=Greedy(),
                         attn_impl=pipeline.attn_impl)
    tokens = np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist()
    t2 = time.perf_counter()
    report = memory_report(state.cache)
    return Answer(text=pipeline.tokenizer.decode(tokens), tokens=tuple(tokens),
                  kv_bytes_needed=int(report.kv_bytes_needed), bytes_held=int(report.bytes_held),
                  context_kv_bytes=context_kv_bytes, n_context=n_context,
                  n_question=len(q_ids), prefill_s=times[0], compress_s=times[1] + t1 - t0,
                  decode_s=t2 - t1)
