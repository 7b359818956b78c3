"""The two mesh-aware jitted primitives of a request, and their composition.

  prefill_prompt(fn, params, tokens, lengths, ...) -> (logits [B, V], Prompt)
      the model over the prompt (observations as the press asks, the between-layers hook,
      then the press's prompt observer, e.g. KVzip's repeat pass); nothing is compressed.
  compress_prompt(press, prompt, plan) -> KVCache
      the press's selection written to the store, quantized and pinned to the mesh.
  prefill(fn, params, tokens, lengths, ...) -> (logits, KVCache)
      both in one jitted call (no Prompt buffers survive it).

Every caller (`kvjax.generate`, `Pipeline`, `kvjax eval`, the KVzap trainer, the engine)
prefills through these, so a mesh is handled in one place: the batch is sharded over
"data", the model traces under `kvjax.sharding.mesh_context` (the Pallas kernels run per
device through `jax.shard_map`), the store gets one row per "model" device
(`kvjax.sharding.store_rows`) and the cache is pinned with `constrain_cache`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.attention import resolve_attn_impl
from kvjax.cache import KVCache
from kvjax.compress import compress, obs_spec_for
from kvjax.observation import ObsSpec
from kvjax.prompt import Prompt
from kvjax.sharding import constrain_batch, constrain_cache, mesh_context, mesh_of, store_rows


def check_between_ran(between, prompt: Prompt, n_tokens: int) -> None:
    """ValueError unless the model split its layer scan where the between-layers hook asks.

    A model that accepts `between=` and ignores it (one layer group, every token kept) would
    make UNComp's `prefill_keep` silently prune nothing; checked from static shapes."""
    want = len(between.starts(n_tokens)) + 1
    if len(prompt.groups) != want:
        raise ValueError(
            f"the model's prefill returned {len(prompt.groups)} layer group(s), but the "
            f"between-layers hook {type(between).__name__} prunes before layers "
            f"{between.starts(n_tokens)} ({want} groups): a model must run "
            "`between(layer, h, positions, lengths, prev)` at `between.starts(T)` and return "
            "one PromptGroup per segment (docs/loading.md), or the press prunes nothing")


def _prefill_body(fn, params, tokens, lengths, obs_spec, attn_impl, between, observer):
    mesh = mesh_of(fn)
    tokens, lengths = constrain_batch(tokens, mesh), constrain_batch(lengths, mesh)
    with mesh_context(mesh):
        logits, prompt = fn.prefill(params, tokens, lengths, obs_spec=obs_spec,
                                    attn_impl=attn_impl, between=between)
        if between is not None:
            check_between_ran(between, prompt, tokens.shape[1])
        if observer is not None:
            prompt = observer(fn, params, tokens, prompt, resolve_attn_impl(attn_impl))
    return logits, prompt


def _compress_body(press, prompt: Prompt, tail_capacity, hook, quant, mesh,
                   decode_len=0) -> KVCache:
    rows = store_rows(mesh, prompt.groups[0].layers.k.shape[2])
    cache = compress(press, prompt, tail_capacity=tail_capacity, hook=hook, quant=quant,
                     rows=rows, decode_len=decode_len)
    return constrain_cache(cache, mesh)


@functools.partial(jax.jit, static_argnames=("fn", "attn_impl", "obs_spec", "between",
                                             "observer"))
def prefill_prompt(fn, params, tokens, lengths, *, obs_spec, attn_impl="auto", between=None,
                   observer=None):
    """Run the prompt without compressing -> (last logits [B, V], Prompt).

    tokens [B, T] int32 right-padded, lengths [B]; `obs_spec`, `between`, `observer` as
    `kvjax.plan.prefill_parts(press, hook)` gives them."""
    return _prefill_body(fn, params, tokens, lengths, obs_spec, attn_impl, between, observer)


@functools.partial(jax.jit, static_argnames=("fn", "observer", "attn_impl"))
def observe_prompt(fn, params, tokens, prompt, *, observer, attn_impl="auto"):
    """Run a press's prompt observer (e.g. KVzip's repeat pass) on a prefill's Prompt (for a
    caller that times the observer apart from the prefill)."""
    with mesh_context(mesh_of(fn)):
        return observer(fn, params, constrain_batch(tokens, mesh_of(fn)), prompt,
                        resolve_attn_impl(attn_impl))


@functools.partial(jax.jit, static_argnames=("tail_capacity", "quant", "mesh", "decode_len"))
def compress_cache(press, prompt, *, tail_capacity, hook=None, quant=None, mesh=None,
                   decode_len=0):
    """The prompt compressed by `press` into a new KVCache (the Prompt's buffers survive, so
    other presses can compress the same prefill). `decode_len`: the generated-token buffer,
    for a decode hook whose budget grows segments. `press` and `hook` are pytrees whose
    leaves are their value fields (a threshold: `kvjax.values`), static otherwise."""
    return _compress_body(press, prompt, tail_capacity, hook, quant, mesh, decode_len)


def compress_prompt(press, prompt, plan) -> KVCache:
    """`compress_cache` with the static choices of a `kvjax.plan.RequestPlan` (its tail,
    decode hook, quantization and mesh); `press` may differ from `plan.press` when several
    presses share one prefill (the eval), as long as their prefill parts are equal. The
    plan's question span, when a press reads it, joins the observation first."""
    if plan.question_rows:
        prompt = with_question(prompt, jnp.asarray(plan.question_len))
    return compress_cache(press, prompt, **plan.compress_parts())


@functools.partial(jax.jit, static_argnames=("fn", "tail_capacity", "attn_impl", "quant",
                                             "question_rows", "decode_len"))
def prefill(fn, params, tokens, lengths, *, tail_capacity, press=None, attn_impl="auto",
            hook=None, quant=None, question_len=None, question_rows: int = 0,
            decode_len: int = 0):
    """`prefill_prompt` then `compress_prompt` in one jitted call -> (logits [B, V], KVCache).

    `hook` is the decode hook the cache will carry (`kvjax.plan.check_hooks`); None: the
    press's own (UNComp's ring decode), if any. `quant` (`kvjax.quant.KVQuant`) stores the
    kept entries quantized. `question_len` [B] (the question's tokens ending each prompt)
    reaches the press as an observation, with `question_rows` (static) query rows kept."""
    if hook is None and press is not None:
        hook = press.decode_hook
    between = None if press is None else press.between_layers
    observer = None if press is None else press.prompt_observer
    spec = obs_spec_for(press, hook)
    if question_rows:
        spec = spec.merge(ObsSpec(window=question_rows))
    logits, prompt = _prefill_body(fn, params, tokens, lengths, spec, attn_impl, between,
                                   observer)
    if question_len is not None:
        prompt = with_question(prompt, question_len)
    return logits, _compress_body(press, prompt, tail_capacity, hook, quant, mesh_of(fn),
                                  decode_len)


def with_question(prompt: Prompt, question_len: jax.Array) -> Prompt:
    """The prompt with `question_len` [B] in every layer's observation."""
    def group(g):
        n = g.layers.k.shape[0]
        q = jnp.broadcast_to(jnp.asarray(question_len, jnp.int32), (n,) + question_len.shape)
        obs = dataclasses.replace(g.layers.obs, question_len=q)
        return dataclasses.replace(g, layers=dataclasses.replace(g.layers, obs=obs))
    return dataclasses.replace(prompt, groups=tuple(group(g) for g in prompt.groups))


def prefill_request(fn, params, plan):
    """`prefill` of a `kvjax.plan.RequestPlan` -> (logits [B, V], KVCache)."""
    rows = plan.question_rows
    return prefill(fn, params, jnp.asarray(plan.tokens), jnp.asarray(plan.lengths),
                   tail_capacity=plan.tail_capacity, press=plan.press,
                   attn_impl=plan.attn_impl, hook=plan.hook, quant=plan.quant,
                   question_len=jnp.asarray(plan.question_len) if rows else None,
                   question_rows=rows, decode_len=plan.decode_len)
