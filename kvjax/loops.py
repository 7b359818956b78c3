"""Jitted prefill / compress / decode loops over any model exposing `kvjax_split()`.

A model plugs in by returning `(fn, params)` from `kvjax_split()`, where `fn` satisfies
`kvjax.model.ModelFunction` (the contract, with shapes). `models.Decoder` does this with
`nnx.split` / `nnx.merge`; kvjax itself never imports flax.
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import resolve_attn_impl
from kvjax.buckets import BUCKET_STEP, MIN_BUCKET, bucket_length, pad_prompts  # noqa: F401
from kvjax.cache import KVCache
from kvjax.hooks import hook_or_default
from kvjax.plan import check_budget, plan_request, split_model  # noqa: F401
from kvjax.prefill import (compress_prompt, observe_prompt, prefill, prefill_prompt,  # noqa: F401
                           prefill_request)
from kvjax.sampling import Greedy, check_sampler
from kvjax.sharding import constrain_cache, mesh_context, mesh_of, to_host

MAX_EOS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Loop state of the jitted decode (donated between calls).

    Attributes:
      step: [] int32 tokens generated so far; tokens: [B, S_out] int32 output buffer;
      lengths: [B] generated tokens per sequence (EOS included); done: [B] bool;
      logits: [B, V] f32 logits for the next token; cache: KVCache; rng: PRNG key.
    """

    step: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    logits: jax.Array
    cache: KVCache
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens [B, max_new_tokens] (pad after EOS), lengths [B], the final cache."""

    tokens: np.ndarray
    lengths: np.ndarray
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("fn", "attn_impl"), donate_argnames=("cache",))
def extend(fn, params, tokens, n_new, cache, *, attn_impl="auto"):
    """Append right-padded tokens [B, T] (n_new [B] real) -> (logits at the last real, cache)."""
    with mesh_context(mesh_of(fn)):
        logits, cache = fn.decode(params, tokens, n_new, cache, attn_impl=attn_impl)
    cache = constrain_cache(cache, mesh_of(fn))
    last = jnp.take_along_axis(logits, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)
    return last[:, 0], cache


def _step(fn, params, state: DecodeState, eos_ids, sampler, attn_impl, pad_id) -> DecodeState:
    rng, key = jax.random.split(state.rng)
    tok = jnp.where(state.done, pad_id, sampler(state.logits, key))
    tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, state.step))
    active = ~state.done
    done = state.done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    with mesh_context(mesh_of(fn)):
        logits, cache = fn.decode(params, tok[:, None], active.astype(jnp.int32), state.cache,
                                  attn_impl=attn_impl)
    if cache.hook is not None:
        cache = cache.hook.after_step(cache)
    cache = constrain_cache(cache, mesh_of(fn))
    return DecodeState(step=state.step + 1, tokens=tokens,
                       lengths=state.lengths + active.astype(jnp.int32), done=done,
                       logits=logits[:, 0], cache=cache, rng=rng)


def _room(state: DecodeState) -> jax.Array:
    """Room for one more token: in the output buffer and in the cache (the hook decides: a
    DecodingPress merges before the tail fills, the ring decode has no tail)."""
    hook = hook_or_default(state.cache.hook)
    return hook.room(state.cache) & (state.step < state.tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("fn", "sampler", "attn_impl", "pad_id"),
                   donate_argnames=("state",))
def decode(fn, params, state, max_new_tokens, eos_ids, *, sampler, attn_impl="auto", pad_id=0):
    """Generate until every sequence hit EOS, `max_new_tokens` (traced) or the buffer end.

    The cache's decode hook (a DecodingPress merges the tail into the segments every
    `compression_interval` tokens) runs after every step, so generation may run past the
    tail's capacity with bounded memory.
    """
    def cond(s):
        return (s.step < max_new_tokens) & ~jnp.all(s.done) & _room(s)

    def body(s):
        return _step(fn, params, s, eos_ids, sampler, attn_impl, pad_id)

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("fn", "sampler", "attn_impl", "pad_id"),
                   donate_argnames=("state",))
def decode_step(fn, params, state, eos_ids, *, sampler, attn_impl="auto", pad_id=0):
    """One token of the same loop body, for streaming to a terminal or notebook."""
    return _step(fn, params, state, eos_ids, sampler, attn_impl, pad_id)


def eos_ids(eos_id, vocab_size: int | None = None) -> tuple[int, ...]:
    """`eos_id` (None, an id or ids) as a tuple of ints.

    ValueError on a non-integer id, one outside [0, vocab_size) (it could never match), or more
    than MAX_EOS ids."""
    ids = () if eos_id is None else (
        (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id))
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 or (
                vocab_size is not None and i >= vocab_size):
            raise ValueError(f"{eos_id=}: EOS ids must be ints in [0, vocab_size="
                             f"{vocab_size}); {i!r} is not")
    if len(ids) > MAX_EOS:
        raise ValueError(f"{len(ids)=} EOS ids; at most {MAX_EOS} are supported")
    return tuple(int(i) for i in ids)


def eos_array(eos_id, vocab_size: int | None = None) -> jax.Array:
    """EOS ids (checked by `eos_ids`) as a fixed-size int32 array (padded with -1) so changing
    them never recompiles."""
    ids = list(eos_ids(eos_id, vocab_size))
    return jnp.asarray(ids + [-1] * (MAX_EOS - len(ids)), jnp.int32)


def init_state(logits, cache, batch: int, out_len: int, rng) -> DecodeState:
    """The decode loop's initial state, after prefill (and any extend); out_len = token buffer."""
    rng = jax.random.key(0) if rng is None else rng
    return DecodeState(step=jnp.zeros((), jnp.int32), tokens=jnp.zeros((batch, out_len), jnp.int32),
                       lengths=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
                       logits=logits, cache=cache, rng=rng)


def start(fn, params, input_ids, *, max_new_tokens: int, press=None, attn_impl: str = "auto",
          rng=None, tail_extra: int = 0, decoding_press=None, kv_dtype=None, tokenizer=None,
          question_len=None):
    """Plan (`kvjax.plan.plan_request`: every check, before any tracing), prefill and
    compress: returns (DecodeState, lengths).

    `tail_extra` reserves tail slots for tokens appended before decoding (a question). With a
    `decoding_press` the tail holds `compression_interval` (+ tail_extra) slots only.
    `kv_dtype` ("int8", "float8_e4m3fn" or a `kvjax.quant.KVQuant`) quantizes the store.
    `question_len`: the question's tokens ending each prompt, for presses that read it.
    """
    plan = plan_request(fn, input_ids, max_new_tokens=max_new_tokens, press=press,
                        decoding_press=decoding_press, kv_dtype=kv_dtype,
                        tail_extra=tail_extra, attn_impl=attn_impl, tokenizer=tokenizer,
                        question_len=question_len)
    logits, cache = prefill_request(fn, params, plan)
    return init_state(logits, cache, plan.batch, plan.out_len, rng), plan.lengths


def generate(model, input_ids, *, max_new_tokens: int, sampler=Greedy(), eos_id=None, rng=None,
             press=None, attn_impl: str = "auto", pad_id: int = 0,
             decoding_press=None, kv_dtype=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` for a ragged batch of prompts.

    Args:
      model: a model with `kvjax_split()` (e.g. `models.Decoder`).
      input_ids: a batch of token-id lists of different lengths (or one list).
      max_new_tokens: tokens to generate at most (traced: changing it does not recompile).
      sampler: Greedy(), Temperature(t), TopK(k), TopP(p).
      eos_id: an id or ids that end a sequence; None never stops early.
      rng: PRNG key for sampling (default key 0).
      press: a compression press applied right after prefill; None keeps the full cache.
      attn_impl: "auto" (Pallas on GPU/TPU, reference on CPU), "reference", ...
      decoding_press: a `DecodingPress` that merges the tail into the prefix every
        `compression_interval` generated tokens (memory bounded by prefix + interval).
      kv_dtype: None (the compute dtype), "int8" or "float8_e4m3fn": the kept entries are
        stored quantized with f32 scales (`kvjax.quant`; a `KVQuant` picks the scheme).

    Returns:
      GenerateOutput(tokens [B, max_new_tokens], lengths [B], cache).
    """
    fn, params = split_model(model)
    check_sampler(sampler)
    eos = eos_array(eos_id, getattr(fn, "vocab_size", None))
    state, _ = start(fn, params, input_ids, max_new_tokens=max_new_tokens, press=press,
                     attn_impl=attn_impl, rng=rng, decoding_press=decoding_press,
                     kv_dtype=kv_dtype)
    state = decode(fn, params, state, jnp.int32(max_new_tokens), eos,
                   sampler=sampler, attn_impl=resolve_attn_impl(attn_impl), pad_id=pad_id)
    return GenerateOutput(tokens=to_host(state.tokens)[:, :max_new_tokens],
                          lengths=to_host(state.lengths), cache=state.cache)


def stream_state(fn, params, state: DecodeState, *, max_new_tokens: int, sampler=Greedy(),
                 eos_id=None, attn_impl: str = "auto", pad_id: int = 0
                 ) -> Iterator[tuple[np.ndarray, DecodeState]]:
    """Yield (tokens [B] of this step, state) one step at a time with the jitted step."""
    check_sampler(sampler)
    eos = eos_array(eos_id, getattr(fn, "vocab_size", None))
    attn_impl = resolve_attn_impl(attn_impl)
    for _ in range(max_new_tokens):
        if bool(jnp.all(state.done)) or not bool(_room(state)):
            return
        step = int(state.step)
        state = decode_step(fn, params, state, eos, sampler=sampler, attn_impl=attn_impl,
                            pad_id=pad_id)
        yield to_host(state.tokens)[:, step], state


def generate_stream(model, input_ids, *, max_new_tokens: int, sampler=Greedy(), eos_id=None,
                    rng=None, press=None, attn_impl: str = "auto", decoding_press=None,
                    kv_dtype=None) -> Iterator[np.ndarray]:
    """Streaming variant of `generate` (same arguments): yields the new token of every
    sequence, step by step; the same tokens as `generate`."""
    fn, params = split_model(model)
    state, _ = start(fn, params, input_ids, max_new_tokens=max_new_tokens, press=press,
                     attn_impl=attn_impl, rng=rng, decoding_press=decoding_press,
                     kv_dtype=kv_dtype)
    for toks, _ in stream_state(fn, params, state, max_new_tokens=max_new_tokens,
                                sampler=sampler, eos_id=eos_id, attn_impl=attn_impl):
        yield toks
