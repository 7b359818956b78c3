"""The integration API: what any decoder calls to get a compressible kvjax cache.

A decoder layer computes post-RoPE q, k, v itself and hands them to these two pure
functions; they return the attention output, the new `LayerCache` and (in prefill) the
`Observation` that presses score from. Our own `models/` use exactly these functions.

    out, layer_cache, obs = kvjax.prefill_layer(q, k, v, lengths, tail_capacity=256)
    out, layer_cache = kvjax.decode_layer(q, k, v, positions, n_new, layer_cache)
"""

import functools

import jax
import jax.numpy as jnp

from kvjax import dispatch
from kvjax.attention import prefill_attention_and_column_sums, resolve_attn_impl
from kvjax.cache import LayerCache, append_to_tail, init_tail, prefix_from_prompt
from kvjax.grouped import GroupedLayerCache, decode_grouped
from kvjax.observation import Observation, ObsSpec, observe


def prefill_layer(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                  tail_capacity: int, sliding_window: int | None = None,
                  obs_spec: ObsSpec = ObsSpec(), attn_impl: str = "auto",
                  scale: float | None = None, q_prerope: jax.Array | None = None,
                  rope_inv_freq=None,
                  rope_interleaved: bool = False) -> tuple[jax.Array, LayerCache, Observation]:
    """Causal attention over a right-padded prompt; build the layer's cache and observation.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H] post-RoPE keys and values.
      lengths: [B] true prompt lengths.
      tail_capacity: static number of tail slots for tokens appended later.
      sliding_window: attention window in positions (Mistral), None for full attention.
      obs_spec: what the press needs observed (static).
      attn_impl: "auto" | "reference" | "pallas_gpu" | "pallas_tpu" (static).
      scale: logit scale, default 1/sqrt(H).
      q_prerope: [B, T, N, H] queries before RoPE and rope_inv_freq: [H/2] rotary inverse
        frequencies; only presses that model future queries (ExpectedAttention) need them.
      rope_interleaved: True for GPT-J-style rotary pairs (2i, 2i+1), False for Llama's
        rotate-half pairs (i, i + H/2).

    Returns:
      out [B, T, N, H], the LayerCache (prefix = the whole prompt, empty tail), Observation.
    """
    impl = resolve_attn_impl(attn_impl)
    column_sums = None
    if obs_spec.column_sums and sliding_window is None and impl == "reference":
        # H2O scores from the attention's own probabilities, no second pass
        out, column_sums = prefill_attention_and_column_sums(q, k, v, lengths, scale=scale)
    elif obs_spec.column_sums and sliding_window is None:
        # one fused kernel: attention and its column sums
        out, column_sums = dispatch.prefill_attention_with_scores(
            q, k, v, lengths, attn_impl=impl, scale=scale, score_rows="all")
    else:
        out = dispatch.prefill_attention(q, k, v, lengths, attn_impl=impl, scale=scale,
                                         sliding_window=sliding_window)
    b, _, n_kv, h = k.shape
    layer = LayerCache(prefix=prefix_from_prompt(k, v, lengths),
                       tail=init_tail(b, n_kv, tail_capacity, h, k.dtype))
    obs = observe(q, k, lengths, obs_spec, scale=scale, q_prerope=q_prerope,
                  rope_inv_freq=rope_inv_freq, rope_interleaved=rope_interleaved,
                  column_sums=column_sums)
    return out, layer, obs


def decode_layer(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                 n_new: jax.Array, layer: LayerCache, *, sliding_window: int | None = None,
                 attn_impl: str = "auto",
                 scale: float | None = None) -> tuple[jax.Array, LayerCache]:
    """Append T new tokens to the tail and attend over prefix + tail (one softmax).

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H] of the new tokens.
      positions: [B, T] positions of the new tokens.
      n_new: [B] number of real tokens among the T (right padding beyond).
      layer: the layer's cache (a `GroupedLayerCache` decodes group by group).

    Returns:
      out [B, T, N, H] and the updated LayerCache.
    """
    if isinstance(layer, GroupedLayerCache):  # UNComp head groups, each dense
        dense = functools.partial(decode_layer, sliding_window=sliding_window,
                                  attn_impl=attn_impl, scale=scale)
        return decode_grouped(q, k, v, positions, n_new, layer, dense_decode=dense,
                              scale=scale, sliding_window=sliding_window)
    tail = append_to_tail(layer.tail, k, v, positions, n_new)
    layer = LayerCache(prefix=layer.prefix, tail=tail)
    out = dispatch.decode_attention(q, positions, layer, attn_impl=resolve_attn_impl(attn_impl),
                                    scale=scale, sliding_window=sliding_window)
    return out, layer


def decode_positions(next_pos: jax.Array, t: int) -> jax.Array:
    """[B] next positions -> [B, T] positions of T new tokens."""
    return next_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
