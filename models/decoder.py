"""One Flax NNX decoder for Llama 2/3/3.1/3.2 and Mistral (they differ only by config).

Attention goes through kvjax's integration API (`kvjax.prefill_layer`, `kvjax.decode_layer`):
the model computes post-RoPE q, k, v and kvjax owns the cache. Axis letters as in models/config.py.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import kvjax
from kvjax.cache import KVCache
from kvjax.observation import ObsSpec
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

    def prefill(self, x, lengths, positions, *, obs_spec, attn_impl):
        """x [B, T, D], original positions [B, T] -> (y [B, T, D], kvjax.LayerPrompt)."""
        q, k, v, q_pre = self._qkv(x, positions)
        o, prompt = kvjax.prefill_layer(
            q, k, v, lengths, sliding_window=self.sliding_window, obs_spec=obs_spec,
            attn_impl=attn_impl, q_prerope=q_pre, rope_inv_freq=self.rope.inverse_frequencies(),
            hidden=x)
        return self._out(o), prompt

    def decode(self, x, positions, n_new, cache, layer, *, attn_impl):
        """x [B, T, D] new tokens -> (y [B, T, D], KVCache with layer `layer` updated)."""
        q, k, v, _ = self._qkv(x, positions)
        o, cache = kvjax.decode_layer(q, k, v, positions, n_new, cache, layer,
                                      sliding_window=self.sliding_window, attn_impl=attn_impl,
                                      hidden=x, out_proj=self.o_proj.kernel[...])
        return self._out(o), cache


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps, dtype=dtype)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)

    def _mlp_residual(self, h: jax.Array) -> jax.Array:
        return h + self.mlp(self.post_attention_layernorm(h))

    def prefill(self, h, lengths, positions, **kw):
        y, prompt = self.self_attn.prefill(self.input_layernorm(h), lengths, positions, **kw)
        return self._mlp_residual(h + y), prompt

    def decode(self, h, positions, n_new, cache, layer, **kw):
        y, cache = self.self_attn.decode(self.input_layernorm(h), positions, n_new, cache, layer,
                                         **kw)
        return self._mlp_residual(h + y), cache


class Decoder(nnx.Module):
    """A Llama-architecture causal LM that keeps its KV cache outside, as a kvjax pytree.

    The blocks are one stacked module (parameters with a leading layer axis) that prefill and
    decode run with `lax.scan`: one layer is compiled whatever the depth. Its prefill runs a
    between-layers hook (UNComp's hidden-state pruning), which it declares to kvjax.
    """

    supports_between = True

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(cfg, dtype=dtype, rngs=rngs)

        self.layers = blocks(rngs)
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

    def _scan(self, body, carry, start: int = 0, stop: int | None = None):
        """lax.scan of body(carry, block, layer_idx) -> (carry, out) over blocks [start, stop)."""
        graphdef, state = nnx.split(self.layers)
        stop = self.config.n_layers if stop is None else stop
        state = jax.tree.map(lambda x: x[start:stop], state)

        def step(c, xs):
            st, layer = xs
            return body(c, nnx.merge(graphdef, st), layer)

        return jax.lax.scan(step, carry, (state, jnp.arange(start, stop, dtype=jnp.int32)))

    def prefill(self, tokens: jax.Array, lengths: jax.Array, *, obs_spec: ObsSpec = ObsSpec(),
                attn_impl: str = "auto", between=None, all_logits: bool = False,
                return_hidden: bool = False):
        """Run the prompt; return what kvjax compresses.

        Args:
          tokens: [B, T] right-padded prompt ids; lengths: [B] true lengths (>= 1).
          obs_spec: what presses need observed; attn_impl: static dispatch key.
          between: a kvjax between-layers hook (e.g. UNComp's hidden-state pruning,
            `kvjax.presses.pruning.HiddenPruning`) or None. Before each layer in
            `between.starts(T)` the residual stream, positions and lengths go through
            `between(layer, h, positions, lengths, previous_layer_prompt)`.
          all_logits: logits of every position [B, T, V] instead of the last [B, V] (with
            pruning: of every token that reached the last layer).
          return_hidden: also return every layer's output hidden states (a tuple of
            [B, T_l, D]), e.g. for UNComp calibration.

        Returns:
          (logits, kvjax.prompt.Prompt) [+ hidden states when return_hidden].
        """
        n_layers = self.config.n_layers
        starts = ()
        if between is not None:
            between.check(n_layers, self.config.sliding_window)
            between.check_obs(obs_spec)
            obs_spec = obs_spec.merge(between.obs_spec)
            starts = between.starts(tokens.shape[1])
        h = self.embed_tokens(tokens)
        positions = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
        cur, groups, hidden = lengths.astype(jnp.int32), [], []
        bounds = (0,) + starts + (n_layers,)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if start in starts:
                last = jax.tree.map(lambda x: x[-1], groups[-1].layers)
                h, positions, cur = between(start, h, positions, cur, last)

            def body(carry, block, layer, positions=positions, cur=cur):
                out, prompt = block.prefill(carry, cur, positions, obs_spec=obs_spec,
                                            attn_impl=attn_impl)
                return out, (prompt, out if return_hidden else None)

            h, (layers, hs) = self._scan(body, h, start, stop)
            groups.append(kvjax.PromptGroup(layers=layers, positions=positions, lengths=cur))
            if return_hidden:
                hidden.extend(hs[i] for i in range(stop - start))
        if not all_logits:
            h = jnp.take_along_axis(h, (cur - 1)[:, None, None], axis=1)
        logits = self.logits(h)
        prompt = kvjax.Prompt(groups=tuple(groups), next_pos=lengths.astype(jnp.int32))
        out = (logits if all_logits else logits[:, 0]), prompt
        return out + (tuple(hidden),) if return_hidden else out

    def decode(self, tokens: jax.Array, n_new: jax.Array, cache: KVCache, *,
               attn_impl: str = "auto") -> tuple[jax.Array, KVCache]:
        """Append T tokens per sequence (n_new [B] of them real) -> (logits [B, T, V], cache)."""
        positions, cache = kvjax.begin_decode(cache, tokens.shape[1], n_new)

        def body(carry, block, layer):
            h, c = carry
            h, c = block.decode(h, positions, n_new, c, layer, attn_impl=attn_impl)
            return (h, c), None

        (h, cache), _ = self._scan(body, (self.embed_tokens(tokens), cache))
        return self.logits(h), cache

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Plain full forward: tokens [B, T] -> logits [B, T, V] (no padding)."""
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        return self.prefill(tokens, lengths, all_logits=True)[0]

    def kvjax_split(self):
        """Split into (hashable functional model, params) for kvjax's jitted loops."""
        from models.functional import split_model
        return split_model(self)
