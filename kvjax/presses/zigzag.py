"""ZigZagKV: per-input layer budgets from layer uncertainty (arXiv 2412.09036, COLING 2025).

No public implementation exists; the choices the paper leaves open are documented here and in
docs/zigzagkv.md:
  * LMBA is measured per *query* head on the SnapKV window attention (rows = the last W
    prompt queries, averaged), over all prompt tokens (window included), then averaged over
    the layer's heads; per sequence, so budgets are per input.
  * The floor is `budget_floor_ratio * B_avg`; budgets are clamped to [window + 1, T] (or
    [B_avg, B_avg] when B_avg <= window), the clamped excess redistributed proportionally to
    the unclamped layers' shares, and rounded by largest remainder so the sum is exactly
    L * B_avg with B_avg = ceil((1 - r) * T).
  * Tokens inside a layer: SnapKV (window W, pooling kernel 7, max pooling), window kept.
  * Eviction happens once at the end of prefill (the paper's "dynamic" setting), so the
    prefill peak holds the full cache; `profile=` gives static per-layer shares instead.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache, Pool, Prefix
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, Press, validate_ratio
from kvjax.presses.snapkv import POOLINGS, check_window, snapkv_scores
from kvjax.presses.window import window_attention


def lmba_per_head(probs: jax.Array, valid: jax.Array, tau: float) -> jax.Array:
    """Smallest number of tokens whose attention mass reaches tau of the head's total.

    Args:
      probs: [..., W, C] window attention rows; valid: [..., C] valid tokens (broadcastable).
      tau: attention mass threshold in (0, 1].

    Returns:
      [...] int32 counts (>= 1).
    """
    a = jnp.where(valid, probs.mean(-2), 0.0)
    a = -jnp.sort(-a, axis=-1)
    csum = jnp.cumsum(a, axis=-1)
    total = csum[..., -1:]
    return (jnp.sum(csum < tau * total - 1e-7 * total, axis=-1) + 1).astype(jnp.int32)


def allocate(lmba: jax.Array, b_avg: jax.Array, seq_len: jax.Array, *, floor_ratio: float,
             window: int) -> jax.Array:
    """Layer budgets for one sequence: floor + proportional share, clamped, summing to L*B_avg.

    Args:
      lmba: [L] per-layer LMBA (positive); b_avg: [] average budget; seq_len: [] prompt length.

    Returns:
      [L] int32 budgets with sum exactly L * b_avg, each in [min(window+1, b_avg), seq_len].
    """
    n = lmba.shape[0]
    total = n * b_avg
    u = lmba / jnp.sum(lmba)
    floor = floor_ratio * b_avg
    x = floor + (b_avg - floor) * n * u
    lo = jnp.minimum(window + 1, b_avg).astype(jnp.float32)
    hi = seq_len.astype(jnp.float32)

    def redistribute(_, x):
        x = jnp.clip(x, lo, hi)
        gap = total - jnp.sum(x)
        movable = jnp.where(gap > 0, x < hi, x > lo)
        w = jnp.where(movable, u + 1e-12, 0.0)
        return x + gap * w / jnp.maximum(jnp.sum(w), 1e-12)

    x = jnp.clip(jax.lax.fori_loop(0, n + 1, redistribute, x), lo, hi)
    return _largest_remainder(x, total, hi)


def _largest_remainder(x: jax.Array, total: jax.Array, hi: jax.Array) -> jax.Array:
    base = jnp.floor(x + 1e-6)
    short = (total - jnp.sum(base)).astype(jnp.int32)
    frac = jnp.where(base < hi, x - base, -1.0)
    order = jnp.argsort(-frac, stable=True)
    bonus = jnp.zeros_like(base).at[order].set((jnp.arange(x.shape[0]) < short).astype(base.dtype))
    return (base + bonus).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZigZagKVPress(Press):
    """ZigZagKV (Zhong et al., COLING 2025, arXiv 2412.09036).

    Layers whose attention is diffuse need more of the budget: LMBA_l (the fewest tokens
    holding `attention_mass` of the window attention, averaged over heads) gives
    u_l = LMBA_l / sum LMBA and B_l = B_floor + (B_avg - B_floor) * L * u_l per input; SnapKV
    picks the tokens inside each layer. The kept entries live in one pool of exactly
    L * B_avg slots per sequence and kv head (`KVCache.pool`), so memory follows the budgets
    without a compilation per budget vector. `profile` (per-layer shares, e.g. from
    `kvjax zigzag-profile`) gives static budgets and per-layer arrays instead.
    """

    compression_ratio: float = 0.0
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    attention_mass: float = 0.9
    budget_floor_ratio: float = 0.2
    profile: tuple[float, ...] | None = None

    def __post_init__(self):
        validate_ratio(self.compression_ratio)
        if not 0.0 < self.attention_mass <= 1.0:
            raise ValueError(f"{self.attention_mass=} must be in (0, 1]")
        if not 0.0 <= self.budget_floor_ratio <= 1.0:
            raise ValueError(f"{self.budget_floor_ratio=} must be in [0, 1]")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.pooling=} is not one of {POOLINGS}")
        if self.profile is not None and (not isinstance(self.profile, tuple)
                                         or min(self.profile) <= 0):
            raise ValueError(f"profile={self.profile!r} must be a tuple of positive shares")

    @property
    def obs_spec(self):
        return ObsSpec(window=self.window_size)

    def check_prompt(self, min_prompt_len):
        check_window(self, min_prompt_len)

    def compress_layer(self, layer, obs, ctx):
        raise NotImplementedError("ZigZagKVPress allocates across layers: use compress()")

    def _scores(self, prefix, obs, ctx):
        return select.mask_invalid(
            snapkv_scores(prefix, obs, ctx.prompt_len, self.window_size, self.kernel_size,
                          self.pooling), prefix.length)

    def lmba(self, cache: KVCache, observations) -> jax.Array:
        """[B, L] LMBA of every layer and sequence."""
        out = []
        for layer, obs in zip(cache.layers, observations):
            p = layer.prefix
            probs = window_attention(p, obs, cache.next_pos, self.window_size)  # [B,K,G,W,C]
            valid = (jnp.arange(p.capacity) < p.length[..., None])[:, :, None, :]
            out.append(lmba_per_head(probs, valid, self.attention_mass).mean(axis=(1, 2)))
        return jnp.stack(out, axis=1)

    def budgets(self, cache: KVCache, observations) -> jax.Array:
        """[B, L] int32 per-input layer budgets (sum L * B_avg per sequence)."""
        t = cache.next_pos
        b_avg = select.ceil_keep(t, self.compression_ratio)
        if self.profile is not None:
            if len(self.profile) != len(cache.layers):
                raise ValueError(f"profile has {len(self.profile)} layers, the model "
                                 f"{len(cache.layers)}")
            shares = jnp.broadcast_to(jnp.asarray(self.profile, jnp.float32), (t.shape[0],
                                                                              len(self.profile)))
        else:
            shares = self.lmba(cache, observations).astype(jnp.float32)
        alloc = lambda s, a, n: allocate(s, a, n, floor_ratio=self.budget_floor_ratio,
                                         window=self.window_size)
        return jax.vmap(alloc)(shares, b_avg, t)

    def compress(self, cache, observations):
        if self.compression_ratio == 0:
            return cache
        budgets = self.budgets(cache, observations)
        if self.profile is not None:
            return self._per_layer(cache, observations, budgets)
        return self._pooled(cache, observations, budgets)

    def _select(self, layer, obs, ctx, n_keep, capacity) -> Prefix:
        p = layer.prefix
        n = jnp.broadcast_to(jnp.minimum(n_keep[:, None], p.length), p.length.shape)
        mask = select.topk_mask(self._scores(p, obs, ctx), n, capacity)
        return select.compact(p, mask, capacity)

    def _per_layer(self, cache, observations, budgets):
        c = cache.layers[0].prefix.capacity
        total = len(cache.layers) * select.ceil_keep_static(c, self.compression_ratio)
        share = [s / sum(self.profile) for s in self.profile]
        layers = []
        for i, (layer, obs) in enumerate(zip(cache.layers, observations)):
            cap = min(c, math.ceil(share[i] * total) + len(self.profile))
            ctx = LayerContext(cache.next_pos, i, len(cache.layers))
            layers.append(dataclasses.replace(layer, prefix=self._select(
                layer, obs, ctx, budgets[:, i], cap)))
        return dataclasses.replace(cache, layers=tuple(layers))

    def _pooled(self, cache, observations, budgets):
        n_layers = len(cache.layers)
        c = cache.layers[0].prefix.capacity
        seg = c  # any one layer may get up to the whole prompt
        size = pool_slots(n_layers * select.ceil_keep_static(c, self.compression_ratio))
        offset = jnp.cumsum(budgets, axis=1) - budgets
        first = cache.layers[0].prefix
        b, k = first.k.shape[:2]
        pool = Pool(k=jnp.zeros((b, k, size, first.k.shape[-1]), first.k.dtype),
                    v=jnp.zeros((b, k, size, first.v.shape[-1]), first.v.dtype),
                    pos=jnp.zeros((b, k, size), jnp.int32), offset=offset.astype(jnp.int32),
                    length=budgets, max_segment=seg)
        layers = []
        for i, (layer, obs) in enumerate(zip(cache.layers, observations)):
            ctx = LayerContext(cache.next_pos, i, n_layers)
            pool = _write_segment(pool, self._select(layer, obs, ctx, budgets[:, i], seg), i)
            layers.append(dataclasses.replace(layer, prefix=_empty_like(layer.prefix)))
        return dataclasses.replace(cache, layers=tuple(layers), pool=pool)


def pool_slots(kept: int) -> int:
    """Pool slots per sequence and kv head for `kept` kept entries: rounded up to a multiple
    of 8 (at most 7 padding slots), so that the GPU decode kernel's tiled TMA copies read the
    pool in place instead of padding (copying) it every step."""
    return -(-kept // 8) * 8


def _write_segment(pool: Pool, p: Prefix, layer: int) -> Pool:
    """Scatter the first length[b, layer] slots of p into the pool at the layer's offset."""
    size = pool.k.shape[2]
    j = jnp.arange(p.capacity)
    dest = pool.offset[:, layer, None] + j  # [B, S]
    dest = jnp.where(j[None] < pool.length[:, layer, None], dest, size)  # beyond: dropped
    dest = jnp.broadcast_to(dest[:, None], p.pos.shape)

    def put(buf, x):
        return jax.vmap(jax.vmap(lambda bb, xx, dd: bb.at[dd].set(xx.astype(bb.dtype),
                                                                   mode="drop")))(buf, x, dest)

    return dataclasses.replace(pool, k=put(pool.k, p.k), v=put(pool.v, p.v),
                               pos=put(pool.pos, p.pos))


def _empty_like(p: Prefix) -> Prefix:
    b, k = p.k.shape[:2]
    return Prefix(k=jnp.zeros((b, k, 0, p.k.shape[-1]), p.k.dtype),
                  v=jnp.zeros((b, k, 0, p.v.shape[-1]), p.v.dtype),
                  pos=jnp.zeros((b, k, 0), jnp.int32), length=jnp.zeros((b, k), jnp.int32))
