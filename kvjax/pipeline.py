"""`Pipeline(model, tokenizer)(context, question)`: kvpress-style chat QA over a (compressed)
context.

The chat template is applied to the context with a separator, split there, and the context
part is prefilled (and compressed) alone; the question and the template's generation prompt
are appended afterwards (question-agnostic, as kvpress benchmarks). With `question_aware=True`
the question is part of the compressed prompt.

Compress once, answer many: `pipe.compress(context, press=...)` returns a `CompressedContext`
(kvjax/context.py), `pipe.ask(compressed, question)` answers from it, and
`pipe.run(context, questions=[...], press=...)` compresses once and answers every question in
one batched decode over the shared store.
"""

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops as gen
from kvjax.cache import KVCache
from kvjax.context import CompressedContext, for_batch, model_fingerprint, with_tail
from kvjax.hooks import hook_or_default
from kvjax.plan import plan_request, split_model
from kvjax.prefill import prefill_request
from kvjax.quant import resolve_kv_quant
from kvjax.sampling import Greedy
from kvjax.sharding import to_host

_SEPARATOR_CHAR = "#"


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """Answer text and what it cost.

    Attributes:
      text: decoded answer; tokens: generated ids; cache: the final KVCache;
      n_context: context tokens prefilled (and compressed); n_question: tokens appended
      before decoding; prefill_s / decode_s: wall seconds (device-synchronised).
    """

    text: str
    tokens: list[int]
    cache: KVCache
    n_context: int
    n_question: int
    prefill_s: float
    decode_s: float


class Pipeline:
    """Chat-template QA with an optional press; the model is split once at construction."""

    def __init__(self, model, tokenizer, *, attn_impl: str = "auto", kv_dtype=None):
        """`kv_dtype`: None, "int8" or "float8_e4m3fn" (or a `kvjax.quant.KVQuant`): the
        compressed store of every call is kept quantized (`kvjax.quant`)."""
        check_tokenizer(tokenizer)
        self.fn, self.params = split_model(model)
        self.tokenizer = tokenizer
        self.attn_impl = gen.resolve_attn_impl(attn_impl)
        self.kv_quant = resolve_kv_quant(kv_dtype)
        self.model_id = model_fingerprint(model)

    def encode(self, context: str, question: str = "", *, answer_prefix: str = "",
               question_aware: bool = False) -> tuple[list[int], list[int]]:
        """Split the chat prompt into (context ids to compress, ids appended after)."""
        check_text(context=context, question=question, answer_prefix=answer_prefix)
        if question_aware:
            context, question = context + question, ""
        return chat_ids(self.tokenizer, [], context, question, answer_prefix)

    def run(self, context: str, question: str = "", *, max_new_tokens: int = 64, press=None,
            answer_prefix: str = "", question_aware: bool = False, sampler=Greedy(),
            rng=None, decoding_press=None, questions=None):
        """Answer one question about one context; returns text, cache and timings.

        Args:
          context, question: text; the context is compressed alone unless `question_aware`.
          max_new_tokens: answer budget; press: applied after the context prefill;
          answer_prefix: text the answer starts with (appended after the generation prompt);
          sampler, rng: sampling; decoding_press: optional `DecodingPress`.
          questions: several questions instead of `question`: the context is compressed once
            and they are answered in one batched decode (`ask_many`); returns a list.
        """
        if questions is not None:
            if question or question_aware:
                raise ValueError("questions= answers from one question-agnostic compression; "
                                 "do not also pass question or question_aware")
            return self.ask_many(self.compress(context, press=press), questions,
                                 max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
                                 sampler=sampler, rng=rng)
        ctx_ids, q_ids = self.encode(context, question, answer_prefix=answer_prefix,
                                     question_aware=question_aware)
        span = self.question_len(context, question, ctx_ids) if question_aware else None
        t0 = time.perf_counter()
        state = self._prefill(ctx_ids, q_ids, max_new_tokens, press, rng, decoding_press,
                              span)
        jax.block_until_ready(state.logits)
        t1 = time.perf_counter()
        state = gen.decode(self.fn, self.params, state, jnp.int32(max_new_tokens),
                           gen.eos_array(self.tokenizer.eos_ids), sampler=sampler,
                           attn_impl=self.attn_impl)
        tokens = to_host(state.tokens)[0, :int(to_host(state.lengths)[0])].tolist()
        t2 = time.perf_counter()
        return PipelineResult(text=self.tokenizer.decode(tokens), tokens=tokens,
                              cache=state.cache, n_context=len(ctx_ids), n_question=len(q_ids),
                              prefill_s=t1 - t0, decode_s=t2 - t1)

    def __call__(self, context: str, question: str = "", **kwargs) -> str:
        """Answer text only; keyword arguments as in `run`."""
        return self.run(context, question, **kwargs).text

    def stream(self, context: str, question: str = "", **kwargs) -> Iterator[str]:
        """Yield the answer text piece by piece; keyword arguments as in `run`."""
        for piece, _ in self.stream_with_state(context, question, **kwargs):
            yield piece

    def stream_with_state(self, context: str, question: str = "", *, max_new_tokens: int = 64,
                          press=None, answer_prefix: str = "", question_aware: bool = False,
                          sampler=Greedy(), rng=None, decoding_press=None
                          ) -> Iterator[tuple[str, gen.DecodeState]]:
        """Yield (text piece, decode state) per step, with the decode loop's jitted step
        (the same tokens as `run` with the same arguments)."""
        ctx_ids, q_ids = self.encode(context, question, answer_prefix=answer_prefix,
                                     question_aware=question_aware)
        span = self.question_len(context, question, ctx_ids) if question_aware else None
        state = self._prefill(ctx_ids, q_ids, max_new_tokens, press, rng, decoding_press,
                              span)
        tokens, shown = [], ""
        for tok, state in gen.stream_state(self.fn, self.params, state,
                                           max_new_tokens=max_new_tokens, sampler=sampler,
                                           eos_id=self.tokenizer.eos_ids,
                                           attn_impl=self.attn_impl):
            if int(tok[0]) in self.tokenizer.eos_ids:
                yield "", state
                return
            tokens.append(int(tok[0]))
            text = self.tokenizer.decode(tokens)
            yield text[len(shown):], state
            shown = text

    def _prefill(self, ctx_ids, q_ids, max_new_tokens, press, rng,
                 decoding_press=None, question_len=None) -> gen.DecodeState:
        state, _ = gen.start(self.fn, self.params, [ctx_ids], max_new_tokens=max_new_tokens,
                             press=press, attn_impl=self.attn_impl, rng=rng,
                             tail_extra=len(q_ids), decoding_press=decoding_press,
                             kv_dtype=self.kv_quant, tokenizer=self.tokenizer,
                             question_len=question_len)
        return self.append_tokens(state, q_ids)

    def question_len(self, context: str, question: str, ctx_ids: list[int]) -> int:
        """How many of a question-aware prompt's last ids are the question: the ids after
        the first one that differs from the same prompt without the question."""
        alone, _ = self.encode(context, "", question_aware=True)
        first = next((i for i, (a, b) in enumerate(zip(ctx_ids, alone)) if a != b),
                     min(len(alone), len(ctx_ids)))
        return len(ctx_ids) - first if question else 0

    def append_tokens(self, state: gen.DecodeState, ids) -> gen.DecodeState:
        """Feed token ids (e.g. the question) into the state's cache: a list of ints for one
        sequence, or one list per sequence of a batch (no-op if all are empty)."""
        rows = [ids] if not ids or isinstance(ids[0], (int, np.integer)) else list(ids)
        if not any(rows):
            return state
        width = gen.bucket_length(max(map(len, rows)), minimum=16)
        padded = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        logits, cache = gen.extend(self.fn, self.params, jnp.asarray(padded),
                                   jnp.array([len(r) for r in rows], jnp.int32), state.cache,
                                   attn_impl=self.attn_impl)
        return dataclasses.replace(state, logits=logits, cache=cache)

    # -- compress once, answer many (kvjax/context.py) -----------------------------------

    def compress(self, context: str, *, press=None) -> CompressedContext:
        """Prefill and compress `context` once, question-agnostic, for later `ask` calls."""
        ctx_ids, _ = self.encode(context, "")
        plan = plan_request(self.fn, [ctx_ids], max_new_tokens=0, press=press,
                            kv_dtype=self.kv_quant, attn_impl=self.attn_impl,
                            tokenizer=self.tokenizer, decode=False)
        logits, cache = prefill_request(self.fn, self.params, plan)
        return CompressedContext(cache=cache, logits=logits, context_ids=tuple(ctx_ids),
                                 press=None if plan.press is None else repr(plan.press),
                                 model_id=self.model_id)

    def ask(self, compressed: CompressedContext, question: str, *, max_new_tokens: int = 64,
            answer_prefix: str = "", sampler=Greedy(), rng=None,
            decoding_press=None) -> PipelineResult:
        """Answer `question` from a compressed context (which is left untouched): the same
        tokens as `run(context, question, press=...)` would give."""
        return self._answer(compressed, [question], max_new_tokens, answer_prefix, sampler, rng,
                            decoding_press)[0]

    def ask_many(self, compressed: CompressedContext, questions, *, max_new_tokens: int = 64,
                 answer_prefix: str = "", sampler=Greedy(), rng=None) -> list[PipelineResult]:
        """Answer several questions in one batched decode; their sequences share the
        compressed store (one copy of it in memory; see `kvjax.context.share`), except under
        a press whose decode hook rewrites the store (UNComp's ring decode): one copy each."""
        if isinstance(questions, str):
            raise TypeError(f"questions={questions[:40]!r} is one string: pass a list of "
                            "questions, or call ask() for one")
        if not questions:
            raise ValueError("questions is empty")
        return self._answer(compressed, list(questions), max_new_tokens, answer_prefix,
                            sampler, rng, None)

    def _answer(self, compressed, questions, max_new_tokens, answer_prefix, sampler, rng,
                decoding_press) -> list[PipelineResult]:
        if not isinstance(compressed, CompressedContext):
            raise TypeError(f"compressed of type {type(compressed).__name__} is not a "
                            "CompressedContext: make one with Pipeline.compress(context) or "
                            "CompressedContext.load(path)")
        if compressed.model_id != self.model_id:
            raise ValueError(f"this context was compressed by model {compressed.model_id}, "
                             f"not this pipeline's ({self.model_id})")
        q_ids = [self.encode("", q, answer_prefix=answer_prefix)[1] for q in questions]
        n_q = max(map(len, q_ids))
        gen.check_budget(self.fn, compressed.n_context + n_q, max_new_tokens)
        cache = _with_hook(compressed.cache, decoding_press)
        out_len = gen.bucket_length(max_new_tokens + n_q)
        tail = hook_or_default(cache.hook).tail_slots(out_len, n_q)
        cache = with_tail(jax.tree.map(jnp.copy, cache), tail + cache.tail.capacity)
        cache = for_batch(cache, len(questions))
        t0 = time.perf_counter()
        logits = jnp.broadcast_to(compressed.logits, (len(questions),)
                                  + compressed.logits.shape[1:])
        state = self.append_tokens(gen.init_state(logits, cache, len(questions), out_len, rng),
                                   q_ids if len(questions) > 1 else q_ids[0])
        jax.block_until_ready(state.logits)
        t1 = time.perf_counter()
        state = gen.decode(self.fn, self.params, state, jnp.int32(max_new_tokens),
                           gen.eos_array(self.tokenizer.eos_ids), sampler=sampler,
                           attn_impl=self.attn_impl)
        toks, lens = to_host(state.tokens), to_host(state.lengths)
        t2 = time.perf_counter()
        return [PipelineResult(text=self.tokenizer.decode(toks[i, :lens[i]].tolist()),
                               tokens=toks[i, :lens[i]].tolist(), cache=state.cache,
                               n_context=compressed.n_context, n_question=len(q_ids[i]),
                               prefill_s=t1 - t0, decode_s=t2 - t1)
                for i in range(len(questions))]


def chat_ids(tokenizer, history, context: str, question: str = "",
             answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """The chat prompt of `history` (earlier messages) and one user turn `context + question`,
    split into (ids to compress: the prompt up to the end of `context`, ids appended after:
    the question, the template's generation prompt and `answer_prefix`).

    A tokenizer without a chat template (a plain LM) gives bos + context, then the question
    on a new line; it takes no history."""
    if tokenizer.chat_template is None:
        if history:
            raise ValueError("this tokenizer has no chat template: earlier messages cannot "
                             "be rendered (send the prompt as a completion)")
        bos = tokenizer.bos_id
        ctx_text = ("" if bos is None else tokenizer.id_to_token(bos)) + context
        suffix = "\n"
    else:
        sep = _SEPARATOR_CHAR * (len(context) + 10)  # as kvpress: split the template there
        text = tokenizer.apply_chat_template(
            list(history) + [{"role": "user", "content": context + sep}],
            add_generation_prompt=True)
        if text.count(sep) != 1:
            raise ValueError("the chat template altered the context separator")
        ctx_text, suffix = text.split(sep)
    ctx_ids = tokenizer.encode(ctx_text, add_bos=False)
    q_ids = tokenizer.encode(question + suffix + answer_prefix, add_bos=False)
    return ctx_ids, q_ids


def check_text(**named) -> None:
    """TypeError naming the first argument that is not a str (a context, question, ...)."""
    for name, value in named.items():
        if not isinstance(value, str):
            raise TypeError(f"{name}={value!r:.60} must be a str")


def check_tokenizer(tokenizer) -> None:
    """Raise unless `tokenizer` can encode, decode and apply a chat template (a model loaded
    from a directory without tokenizer.json has none: `models.load` returns None)."""
    if tokenizer is None:
        raise ValueError("tokenizer=None: Pipeline needs a tokenizer (the model's source had "
                         "none, e.g. an HF directory without tokenizer.json); use "
                         "kvjax.generate with token ids instead, or add the tokenizer files")
    missing = [m for m in ("encode", "decode", "eos_ids", "chat_template")
               if not hasattr(tokenizer, m)]
    if missing:
        raise TypeError(f"tokenizer of type {type(tokenizer).__name__} lacks {missing}: pass "
                        "the tokenizer that models.load returns")


def _with_hook(cache: KVCache, decoding_press) -> KVCache:
    """The cache carrying `decoding_press` as its decode hook (refused next to a press's own
    hook, or over thin keys)."""
    if decoding_press is None:
        return cache
    if cache.hook is not None:
        raise ValueError(f"the compressed context carries {type(cache.hook).__name__}; it "
                         f"cannot be combined with {type(decoding_press).__name__}")
    if cache.store.channels is not None or cache.store.value_channels is not None:
        raise ValueError(f"{type(decoding_press).__name__} cannot rewrite the thin keys of a "
                         "ThinK-compressed context")
    if not decoding_press.attachable:
        raise ValueError(f"{decoding_press} needs per-slot scores or room that a context "
                         "compressed without it lacks: pass it to Pipeline.run, or use a "
                         "query-free scorer with the default KeepSize() budget")
    return dataclasses.replace(cache, hook=decoding_press)
