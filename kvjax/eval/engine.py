"""Answer one sample under several presses, prefilling once per observation spec.

`Pipeline.run(context, question, press=p)` prefills and compresses in one jitted call. Here the
same steps are split: presses that need the same observations (`press.obs_spec`) share one
prefill of the context, then each press compresses its own copy of the cache, the question is
appended and the answer decoded exactly as `Pipeline.run` does. On a CPU where a 2k-token
prefill costs tens of seconds this makes a grid of presses and ratios several times cheaper;
tests check the answers equal `Pipeline.run`'s.
"""

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops
from kvjax.eval.sample import Sample
from kvjax.memory import achieved_ratio, memory_report
from kvjax.plan import plan_request, prefill_parts
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
      store_rows: rows R of the compressed store (the "model" size on a mesh that divides the
        kv heads, else 1; docs/architecture.md, "Meshes").
      achieved_ratio: the compression ratio the context reached (`kvjax.achieved_ratio`;
        what a `ThresholdPress` chose for this input).
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
    store_rows: int = 1
    achieved_ratio: float = 0.0


def prefill_key(press, *, with_hook: bool = True) -> tuple:
    """What a press needs from the shared prefill (`kvjax.plan.prefill_parts`, with its own
    decode hook unless `with_hook=False`), as a hashable key: presses with equal keys share
    one prefill."""
    hook = None if press is None or not with_hook else press.decode_hook
    return tuple(prefill_parts(press, hook).values())


def group_by_spec(presses: Sequence, *, with_hook: bool = True) -> list[list[int]]:
    """Indices of `presses` grouped by equal prefills (`prefill_key`), in first-seen order."""
    groups: dict = {}
    for i, press in enumerate(presses):
        groups.setdefault(prefill_key(press, with_hook=with_hook), []).append(i)
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
    ctx_ids, q_ids = pipeline.encode(sample.context, sample.question,
                                     answer_prefix=sample.answer_prefix,
                                     question_aware=question_aware)
    span = pipeline.question_len(sample.context, sample.question, ctx_ids) \
        if question_aware else None
    plans = [plan_request(fn, [ctx_ids], max_new_tokens=sample.max_new_tokens, press=p,
                          kv_dtype=pipeline.kv_quant, tail_extra=len(q_ids),
                          attn_impl=pipeline.attn_impl, tokenizer=pipeline.tokenizer,
                          question_len=span)
             for p in presses]
    tokens, lengths = jnp.asarray(plans[0].tokens), jnp.asarray(plans[0].lengths)
    answers: list[Answer | None] = [None] * len(presses)
    for group in group_by_spec([plan.press for plan in plans]):
        t0 = time.perf_counter()
        first = plans[group[0]]
        logits, prompt = loops.prefill_prompt(fn, params, tokens, lengths,
                                              attn_impl=pipeline.attn_impl,
                                              **first.prefill_parts(observer=False))
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        observer = first.prefill_parts()["observer"]
        if observer is not None:  # e.g. KVzip's repeat pass: part of compression
            prompt = loops.observe_prompt(fn, params, tokens, prompt, observer=observer,
                                          attn_impl=pipeline.attn_impl)
            jax.block_until_ready(prompt)
        times = (t1 - t0, time.perf_counter() - t1)
        for i in group:
            answers[i] = _decode_one(pipeline, plans[i], logits, prompt, q_ids,
                                     sample.max_new_tokens, times, len(ctx_ids))
    return answers


def _decode_one(pipeline, plan, logits, prompt, q_ids, max_new_tokens, times,
                n_context) -> Answer:
    """times: (the shared prefill's seconds, the press's prompt observer's seconds)."""
    t0 = time.perf_counter()
    cache = loops.compress_prompt(plan.press, prompt, plan)
    state = loops.init_state(logits, cache, 1, plan.out_len, None)
    jax.block_until_ready(state.cache)
    t1 = time.perf_counter()
    context_kv_bytes = int(memory_report(state.cache).kv_bytes_needed)
    reached = float(achieved_ratio(state.cache, [n_context])[0])
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
                  decode_s=t2 - t1, store_rows=int(cache.store.k.shape[1]),
                  achieved_ratio=reached)
