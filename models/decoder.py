"""One Flax NNX decoder for Llama 2/3/3.1/3.2 and Mistral (they differ only by config).

Attention goes through kvjax's integration API (`kvjax.prefill_layer`, `kvjax.decode_layer`):
the model computes post-RoPE q, k, v and kvjax owns the cache. Axis letters as in STYLE.md.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import kvjax
from kvjax.cache import KVCache, LayerCache
from kvjax.observation import Observation, ObsSpec
from models.config import ModelConfig
from models.rope import Rope


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def _linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(d_model, mlp_dim, dtype, rngs)
        self.up_proj = _linear(d_model, mlp_dim, dtype, rngs)
        self.down_proj = _linear(mlp_dim, d_model, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.q_proj = _linear(cfg.d_model, cfg.n_heads * cfg.head_dim, dtype, rngs)
        self.k_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, dtype, rngs)
        self.v_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, dtype, rngs)
        self.o_proj = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, dtype, rngs)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """Return post-RoPE q [B, T, N, H], k, v [B, T, K, H] and pre-RoPE q."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        return self.rope(q, positions), self.rope(k, positions), v, q

    def _out(self, o: jax.Array) -> jax.Array:
        return self.o_proj(o.reshape(o.shape[0], o.shape[1], -1))

    def prefill(self, x, lengths, *, tail_capacity, obs_spec, attn_impl, positions=None):
        """x [B, T, D] -> (y [B, T, D], LayerCache, Observation).

        `positions` [B, T] (ascending per row) are the tokens' original positions when earlier
        layers pruned tokens (UNComp); the cache prefix then records them in `pos`.
        """
        pruned = positions is not None
        if not pruned:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        q, k, v, q_pre = self._qkv(x, positions)
        o, layer, obs = kvjax.prefill_layer(
            q, k, v, lengths, tail_capacity=tail_capacity, sliding_window=self.sliding_window,
            obs_spec=obs_spec, attn_impl=attn_impl, q_prerope=q_pre,
            rope_inv_freq=self.rope.inverse_frequencies())
        if pruned:
            pos = jnp.broadcast_to(positions[:, None].astype(jnp.int32), layer.prefix.pos.shape)
            layer = LayerCache(prefix=dataclasses.replace(layer.prefix, pos=pos),
                               tail=layer.tail)
        return self._out(o), layer, obs

    def decode(self, x, positions, n_new, layer, *, attn_impl):
        """x [B, T, D] new tokens -> (y [B, T, D], LayerCache)."""
        q, k, v, _ = self._qkv(x, positions)
        o, layer = kvjax.decode_layer(q, k, v, positions, n_new, layer,
                                      sliding_window=self.sliding_window, attn_impl=attn_impl)
        return self._out(o), layer


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps, dtype=dtype)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)

    def _mlp_residual(self, h: jax.Array) -> jax.Array:
        return h + self.mlp(self.post_attention_layernorm(h))

    def prefill(self, h, lengths, **kw):
        y, layer, obs = self.self_attn.prefill(self.input_layernorm(h), lengths, **kw)
        return self._mlp_residual(h + y), layer, obs

    def decode(self, h, positions, n_new, layer, **kw):
        y, layer = self.self_attn.decode(self.input_layernorm(h), positions, n_new, layer, **kw)
        return self._mlp_residual(h + y), layer


class Decoder(nnx.Module):
    """A Llama-architecture causal LM that keeps its KV cache outside, as a kvjax pytree."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab_size,
                                                               dtype, rngs)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm + LM head in f32: h [B, T, D] -> [B, T, V]."""
        h = self.norm(h)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h, self.embed_tokens.embedding[...],
                              preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, *, tail_capacity: int,
                obs_spec: ObsSpec = ObsSpec(), attn_impl: str = "auto",
                all_logits: bool = False, prefill_keep: tuple[int | None, ...] | None = None,
                prune_window: int = 8, return_hidden: bool = False):
        """Run the prompt, build the cache.

        Args:
          tokens: [B, T] right-padded prompt ids; lengths: [B] true lengths (>= 1).
          tail_capacity: static number of slots for tokens appended later.
          obs_spec: what presses need observed; attn_impl: static dispatch key.
          all_logits: return logits of every position [B, T, V] instead of the last [B, V]
            (with pruning: of every token that reached the last layer).
          prefill_keep: static UNComp hidden-state token pruning (arXiv 2410.03090): per layer,
            the number of tokens entering that layer, or None to keep what arrives. Before a
            layer with keep < current length the residual stream is gathered down to the
            tokens the last `prune_window` queries of the previous layer attended to most
            (summed over heads and window rows); the last `prune_window` tokens always
            survive and original positions are kept (RoPE, cache `pos`). None: no pruning.
          prune_window: W of the importance scores above (static).
          return_hidden: also return every layer's output hidden states (a tuple of
            [B, T_l, D]), e.g. for UNComp calibration.

        Returns:
          (logits, KVCache, per-layer observations) [+ hidden states when return_hidden].
        """
        keep = self._check_keep(prefill_keep, prune_window, obs_spec)
        h = self.embed_tokens(tokens)
        positions, cur = None, lengths
        layers, observations, hidden = [], [], []
        for i, block in enumerate(self.layers):
            if keep[i] is not None and keep[i] < h.shape[1]:
                imp = _window_importance(layers[-1], observations[-1], lengths, prune_window)
                if positions is None:
                    positions = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32),
                                                 h.shape[:2])
                h, positions, cur = _prune_tokens(h, positions, cur, imp, keep[i], prune_window)
                observations[-1] = _trim_obs(observations[-1], obs_spec, layers[-1])
            spec = obs_spec.merge(ObsSpec(window=prune_window)) if _next_prunes(
                keep, i, h.shape[1]) else obs_spec
            h, layer, obs = block.prefill(h, cur, tail_capacity=tail_capacity, obs_spec=spec,
                                          attn_impl=attn_impl, **(
                                              {} if positions is None else
                                              {"positions": positions}))
            layers.append(layer)
            observations.append(obs)
            hidden.append(h)
        if not all_logits:
            h = jnp.take_along_axis(h, (cur - 1)[:, None, None], axis=1)
        logits = self.logits(h)
        cache = KVCache(layers=tuple(layers), next_pos=lengths.astype(jnp.int32))
        out = (logits if all_logits else logits[:, 0]), cache, tuple(observations)
        return out + (tuple(hidden),) if return_hidden else out

    def _check_keep(self, prefill_keep, prune_window, obs_spec) -> tuple:
        n = len(self.layers)
        if prefill_keep is None:
            return (None,) * n
        if len(prefill_keep) != n:
            raise ValueError(f"prefill_keep has {len(prefill_keep)} entries for {n} layers")
        if prefill_keep[0] is not None:
            raise ValueError("prefill_keep[0] must be None (layer 0 has no previous attention)")
        if any(k is not None for k in prefill_keep):
            if self.config.sliding_window is not None:
                raise ValueError("hidden-state pruning needs full attention (no sliding window)")
            if any(k is not None and k < prune_window for k in prefill_keep):
                raise ValueError(f"prefill_keep {prefill_keep} keeps fewer tokens than "
                                 f"{prune_window=}")
            if obs_spec.window > prune_window or obs_spec.proxy_ratio or obs_spec.column_sums:
                raise ValueError(f"with hidden-state pruning a press may observe at most the "
                                 f"last {prune_window=} queries; got {obs_spec}")
        return tuple(prefill_keep)

    def decode(self, tokens: jax.Array, n_new: jax.Array, cache: KVCache, *,
               attn_impl: str = "auto") -> tuple[jax.Array, KVCache]:
        """Append T tokens per sequence (n_new [B] of them real) -> (logits [B, T, V], cache)."""
        positions = kvjax.decode_positions(cache.next_pos, tokens.shape[1])
        h = self.embed_tokens(tokens)
        layers = []
        for i, block in enumerate(self.layers):
            h, layer = block.decode(h, positions, n_new, cache.layer(i), attn_impl=attn_impl)
            layers.append(cache.store(i, layer))
        new_cache = dataclasses.replace(cache, layers=tuple(layers),
                                        next_pos=cache.next_pos + n_new)
        return self.logits(h), new_cache

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Plain full forward: tokens [B, T] -> logits [B, T, V] (no padding)."""
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        return self.prefill(tokens, lengths, tail_capacity=1, all_logits=True)[0]

    def kvjax_split(self):
        """Split into (hashable functional model, params) for kvjax's jitted loops."""
        from models.functional import split_model
        return split_model(self)


def _next_prunes(keep: tuple, i: int, t: int) -> bool:
    """Whether layer i + 1 prunes tokens (so layer i must observe the pruning window)."""
    return i + 1 < len(keep) and keep[i + 1] is not None and keep[i + 1] < t


def _window_importance(layer: LayerCache, obs: Observation, lengths: jax.Array,
                       window: int) -> jax.Array:
    """[B, T] attention each slot received from the last `window` queries of the layer."""
    probs = kvjax.presses.window.window_attention(layer.prefix, obs, lengths, window)
    return jnp.sum(probs, axis=(1, 2, 3))  # [B, K, G, W, C] -> [B, C]


def _prune_tokens(h, positions, lengths, importance, keep: int, window: int):
    """Keep the `keep` most important valid tokens per row (the last `window` always).

    Returns h [B, keep, D], positions [B, keep] (ascending originals) and lengths [B].
    """
    slot = jnp.arange(h.shape[1])[None]
    recent = slot >= (lengths - window)[:, None]
    score = jnp.where(slot < lengths[:, None], jnp.where(recent, jnp.inf, importance), -jnp.inf)
    n_keep = jnp.minimum(keep, lengths).astype(jnp.int32)
    mask = kvjax.presses.select.topk_mask(score[:, None], n_keep[:, None], keep)
    idx = kvjax.presses.select.kept_indices(mask, keep)[0][:, 0]  # [B, keep]
    return (jnp.take_along_axis(h, idx[:, :, None], axis=1),
            jnp.take_along_axis(positions, idx, axis=1), n_keep)


def _trim_obs(obs: Observation, spec: ObsSpec, layer: LayerCache) -> Observation:
    """Drop the window rows that only pruning asked for (the press gets what it asked for)."""
    rows = spec.window_for(layer.prefix.capacity)
    if rows == 0:
        return dataclasses.replace(obs, q_window=None, window_valid=None)
    return dataclasses.replace(obs, q_window=obs.q_window[:, -rows:],
                               window_valid=obs.window_valid[:, -rows:])
