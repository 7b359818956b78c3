"""The integration API: what any decoder calls to get a compressible kvjax cache.

A decoder layer computes post-RoPE q, k, v itself and hands them to these pure functions.
Prefill returns the attention output and a `LayerPrompt` (the layer's keys, values and
observation, which the model stacks over its layers); decode reads and writes the layer's
entries of the shared `KVCache`. Our own `models/` use exactly these functions:

    out, layer_prompt = kvjax.prefill_layer(q, k, v, lengths)            # in a layer scan
    positions, cache = kvjax.begin_decode(cache, n_tokens, n_new)        # once per step
    out, cache = kvjax.decode_layer(q, k, v, positions, n_new, cache, l) # in a layer scan
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import dispatch
from kvjax.attention import resolve_attn_impl
from kvjax.cache import KVCache, advance_tail, write_tail
from kvjax.observation import ObsSpec, observe
from kvjax.prompt import LayerPrompt
from pallas_kernels import AllRows


def prefill_layer(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                  sliding_window: int | None = None, obs_spec: ObsSpec = ObsSpec(),
                  attn_impl: str = "auto", scale: float | None = None,
                  q_prerope: jax.Array | None = None, rope_inv_freq=None,
                  rope_interleaved: bool = False,
                  hidden: jax.Array | None = None) -> tuple[jax.Array, LayerPrompt]:
    """Causal attention over a right-padded prompt; the layer's keys, values, observation.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H] post-RoPE keys and values.
      lengths: [B] true prompt lengths.
      sliding_window: attention window in positions (Mistral), None for full attention.
      obs_spec: what the press needs observed (static).
      attn_impl: "auto" | "reference" | "pallas_gpu" | "pallas_tpu" (static).
      scale: logit scale, default 1/sqrt(H).
      q_prerope: [B, T, N, H] queries before RoPE and rope_inv_freq: [H/2] rotary inverse
        frequencies; only presses that model future queries (ExpectedAttention) need them.
      rope_interleaved: True for GPT-J-style rotary pairs (2i, 2i+1), False for Llama's
        rotate-half pairs (i, i + H/2).
      hidden: [B, T, D] the attention's input (after the layer's norm); only presses that
        score hidden states (KVzap) need it.

    Returns:
      out [B, T, N, H] and LayerPrompt(k, v [B, K, T, H], Observation).
    """
    # H2O scores come with the attention, from its own probabilities
    out, column_sums = dispatch.prefill_attention_with_scores(
        q, k, v, lengths, attn_impl=resolve_attn_impl(attn_impl), scale=scale,
        sliding_window=sliding_window, score_rows=AllRows() if obs_spec.column_sums else None)
    obs = observe(q, lengths, obs_spec, q_prerope=q_prerope, rope_inv_freq=rope_inv_freq,
                  rope_interleaved=rope_interleaved, column_sums=column_sums, hidden=hidden)
    return out, LayerPrompt(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), obs=obs)


def begin_decode(cache: KVCache, n_tokens: int,
                 n_new: jax.Array) -> tuple[jax.Array, KVCache]:
    """Start a decode step of `n_tokens` tokens per sequence (n_new [B] of them real).

    Returns their positions [B, T] and the cache with the tail's positions written and its
    count and `next_pos` advanced; every layer then calls `decode_layer`.
    """
    positions = decode_positions(cache.next_pos, n_tokens)
    tail = advance_tail(cache.tail, positions, n_new)
    return positions, dataclasses.replace(cache, tail=tail,
                                          next_pos=cache.next_pos + n_new.astype(jnp.int32))


def decode_layer(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                 n_new: jax.Array, cache: KVCache, layer, *, sliding_window: int | None = None,
                 attn_impl: str = "auto", scale: float | None = None,
                 hidden: jax.Array | None = None,
                 out_proj: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Store the new tokens of layer `layer` and attend over its kept entries + tail.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H] of the new tokens.
      positions: [B, T] from `begin_decode`; n_new: [B] real tokens among the T.
      cache: the cache after `begin_decode`; layer: the layer index (static or traced).
      hidden: [B, T, D] the attention's input (after the layer's norm); only decode hooks
        that score tokens from hidden states (a DecodingPress over KVzap) need it.
      out_proj: [N * H, D] the layer's output projection (W_O, input rows in head order);
        only hooks that weigh entries by what they write to the residual stream need it
        (KVzip+'s repeat pass, `KVzipPress(kvzip_plus_normalization=True)`).

    Returns:
      out [B, T, N, H] and the cache. A decode hook that owns attention (UNComp's ring)
      decides both; otherwise the tokens go to the tail and attention reads the store in
      place (`kvjax.dispatch.decode_attention`).
    """
    hook = cache.hook
    if hook is not None and hook.owns_attention:
        extra = {}
        if hook.needs_out_proj:
            if hidden is None or out_proj is None:
                raise ValueError(f"{type(hook).__name__} weighs entries by the attention's "
                                 "input and output projection: pass hidden= and out_proj= "
                                 "(W_O, [N * H, D]) to kvjax.decode_layer")
            extra = dict(hidden=hidden, out_proj=out_proj)
        return hook.decode_layer(q, k, v, positions, n_new, cache, layer,
                                 sliding_window=sliding_window, scale=scale, **extra)
    start = cache.tail.count - n_new.astype(jnp.int32)
    cache = dataclasses.replace(cache, tail=write_tail(cache.tail, layer, k, v, start))
    if hook is not None and hook.scores_hidden:
        if hidden is None:
            raise ValueError(f"{type(hook).__name__} scores new tokens from their hidden "
                             "states: pass hidden= (the attention's input) to "
                             "kvjax.decode_layer")
        cache = hook.write_hidden_scores(cache, layer, hidden, positions, start)
    out = dispatch.decode_attention(q, positions, cache, layer,
                                    attn_impl=resolve_attn_impl(attn_impl), scale=scale,
                                    sliding_window=sliding_window)
    return out, cache


def decode_positions(next_pos: jax.Array, t: int) -> jax.Array:
    """[B] next positions -> [B, T] positions of T new tokens."""
    return next_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
