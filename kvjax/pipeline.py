"""`Pipeline(model, tokenizer)(context, question)`: kvpress-style chat QA over a (compressed)
context.

The chat template is applied to the context with a separator, split there, and the context
part is prefilled (and compressed) alone; the question and the template's generation prompt
are appended afterwards (question-agnostic, as kvpress benchmarks). With `question_aware=True`
the question is part of the compressed prompt.
"""

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loops as gen
from kvjax.cache import KVCache
from kvjax.sampling import Greedy

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

    def __init__(self, model, tokenizer, *, attn_impl: str = "auto"):
        self.fn, self.params = model.kvjax_split()
        self.tokenizer = tokenizer
        self.attn_impl = gen.resolve_attn_impl(attn_impl)

    def encode(self, context: str, question: str = "", *, answer_prefix: str = "",
               question_aware: bool = False) -> tuple[list[int], list[int]]:
        """Split the chat prompt into (context ids to compress, ids appended after)."""
        if question_aware:
            context, question = context + question, ""
        if self.tokenizer.chat_template is None:  # plain LM: bos + context, question on a new line
            bos = self.tokenizer.bos_id
            ctx_text = ("" if bos is None else self.tokenizer.id_to_token(bos)) + context
            suffix = "\n"
        else:
            sep = _SEPARATOR_CHAR * (len(context) + 10)  # as kvpress: split the template there
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": context + sep}], add_generation_prompt=True)
            if text.count(sep) != 1:
                raise ValueError("the chat template altered the context separator")
            ctx_text, suffix = text.split(sep)
        ctx_ids = self.tokenizer.encode(ctx_text, add_bos=False)
        q_ids = self.tokenizer.encode(question + suffix + answer_prefix, add_bos=False)
        return ctx_ids, q_ids

    def run(self, context: str, question: str = "", *, max_new_tokens: int = 64, press=None,
            answer_prefix: str = "", question_aware: bool = False, sampler=Greedy(),
            rng=None, decoding_press=None) -> PipelineResult:
        """Answer one question about one context; returns text, cache and timings.

        Args:
          context, question: text; the context is compressed alone unless `question_aware`.
          max_new_tokens: answer budget; press: applied after the context prefill;
          answer_prefix: text the answer starts with (appended after the generation prompt);
          sampler, rng: sampling; decoding_press: optional `DecodingPress`.
        """
        ctx_ids, q_ids = self.encode(context, question, answer_prefix=answer_prefix,
                                     question_aware=question_aware)
        t0 = time.perf_counter()
        state = self._prefill(ctx_ids, q_ids, max_new_tokens, press, rng, decoding_press)
        jax.block_until_ready(state.logits)
        t1 = time.perf_counter()
        state = gen.decode(self.fn, self.params, state, jnp.int32(max_new_tokens),
                           gen.eos_array(self.tokenizer.eos_ids), sampler=sampler,
                           attn_impl=self.attn_impl)
        tokens = np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist()
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
                          sampler=Greedy(), rng=None) -> Iterator[tuple[str, gen.DecodeState]]:
        """Yield (text piece, decode state) per step, with the decode loop's jitted step."""
        ctx_ids, q_ids = self.encode(context, question, answer_prefix=answer_prefix,
                                     question_aware=question_aware)
        state = self._prefill(ctx_ids, q_ids, max_new_tokens, press, rng)
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
                 decoding_press=None) -> gen.DecodeState:
        press = None if press is None else press.with_tokenizer(self.tokenizer)
        state, _ = gen.start(self.fn, self.params, [ctx_ids], max_new_tokens=max_new_tokens,
                             press=press, attn_impl=self.attn_impl, rng=rng,
                             tail_extra=len(q_ids), decoding_press=decoding_press)
        return self.append_tokens(state, q_ids)

    def append_tokens(self, state: gen.DecodeState, ids) -> gen.DecodeState:
        """Feed token ids (e.g. the question) into a one-sequence state's cache (no-op if empty)."""
        if not ids:
            return state
        width = gen.bucket_length(len(ids), minimum=16)
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids)] = ids
        logits, cache = gen.extend(self.fn, self.params, jnp.asarray(padded),
                                   jnp.array([len(ids)], jnp.int32), state.cache,
                                   attn_impl=self.attn_impl)
        return dataclasses.replace(state, logits=logits, cache=cache)
