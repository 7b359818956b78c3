"""ZigZagKV: per-input layer budgets from layer uncertainty (arXiv 2412.09036, COLING 2025).

No public implementation exists; the choices the paper leaves open are documented here and in
docs/zigzagkv.md:
  * LMBA is measured per *query* head on the SnapKV window attention (rows = the last W
    prompt queries, averaged), over all prompt tokens (window included), then averaged over
    the layer's heads; per sequence, so budgets are per input.
  * The floor is `budget_floor_ratio * B_avg` (0.8 by default: the paper gives no value, and
    0.8 beats SnapKV at equal bytes in every measured cell where the port's 0.2 loses,
    docs/zigzagkv.md; 0.2 remains an option); budgets are clamped to [window + 1, T] (or
    [B_avg, B_avg] when B_avg <= window), the clamped excess redistributed proportionally to
    the unclamped layers' shares, and rounded by largest remainder so the sum is exactly
    L * B_avg with B_avg = ceil((1 - r) * T).
  * Tokens inside a layer: SnapKV (window W, pooling kernel 7, max pooling), window kept.
  * Eviction happens once at the end of prefill (the paper's "dynamic" setting), so the
    prefill peak holds the full cache; `profile=` gives static per-layer shares instead.
  * The budgets are segments of the cache's one store (kvjax/cache.py): exactly
    L * B_avg kept entries per sequence and kv head, whatever the budget vector.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.presses import select
from kvjax.presses.allocating import ScoredAllocation
from kvjax.presses.base import Press, ScorerPress
from kvjax.presses.parts import Allocator, StaticSize
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


@dataclasses.dataclass(frozen=True)
class ZigZag(Allocator):
    """ZigZagKV's per-input layer budgets (the same for every kv head of a layer).

    `layer_stat` is the layer's LMBA [B] on the last `window_size` prompt queries; budgets are
    `allocate`'s, summing to L * ceil((1 - r) T) per sequence. With `profile` (static
    per-layer shares) the shares replace LMBA and the per-layer bounds are static.
    """

    compression_ratio: float
    window_size: int
    attention_mass: float
    budget_floor_ratio: float
    profile: tuple[float, ...] | None = None

    def layer_stat(self, view, obs, scores, ctx):
        if self.profile is not None:
            return None
        probs = window_attention(view, obs, ctx.prompt_len, self.window_size)  # [B,K,G,W,C]
        valid = (jnp.arange(view.capacity) < view.length[..., None])[:, :, None, :]
        return lmba_per_head(probs, valid, self.attention_mass).mean(axis=(1, 2))  # [B]

    def budgets(self, n_valid, stats, prompt_len):
        b, n_layers, n_kv = n_valid.shape
        if self.profile is not None:
            if len(self.profile) != n_layers:
                raise ValueError(f"profile has {len(self.profile)} layers, the model {n_layers}")
            shares = jnp.broadcast_to(jnp.asarray(self.profile, jnp.float32), (b, n_layers))
        else:
            shares = stats.T.astype(jnp.float32)  # [L, B] -> [B, L]
        b_avg = select.ceil_keep(prompt_len, self.compression_ratio)
        alloc = lambda s, a, n: allocate(s, a, n, floor_ratio=self.budget_floor_ratio,
                                         window=self.window_size)
        per_layer = jax.vmap(alloc)(shares, b_avg, prompt_len)  # [B, L]
        return jnp.minimum(per_layer[..., None], n_valid)

    def capacity(self, size, n_kv):
        n_layers, c = len(size.segments), max(size.segments)
        total = n_layers * select.ceil_keep_static(c, self.compression_ratio)
        if self.profile is None:  # any one layer may get up to the whole prompt
            return StaticSize(size.segments, n_kv * total)
        # static shares: the largest budget each layer gets for any prompt length (the floor
        # and the redistribution of clamped excess make shares alone an underestimate)
        with jax.ensure_compile_time_eval():
            n = jnp.arange(1, c + 1, dtype=jnp.int32)
            shares = jnp.asarray(self.profile, jnp.float32)
            alloc = jax.vmap(lambda a, t: allocate(shares, a, t,
                                                   floor_ratio=self.budget_floor_ratio,
                                                   window=self.window_size))
            most = np.asarray(alloc(select.ceil_keep(n, self.compression_ratio), n)).max(0)
        segs = tuple(int(min(seg, m)) for seg, m in zip(size.segments, most))
        return StaticSize(segs, n_kv * total)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZigZagKVPress(ScoredAllocation, Press):
    """ZigZagKV (Zhong et al., COLING 2025, arXiv 2412.09036).

    Layers whose attention is diffuse need more of the budget: LMBA_l (the fewest tokens
    holding `attention_mass` of the window attention, averaged over heads) gives
    u_l = LMBA_l / sum LMBA and B_l = B_floor + (B_avg - B_floor) * L * u_l per input (the
    `ZigZag` allocator). Tokens inside a layer are picked by `scorer`, SnapKV (window
    `window_size`, max-pool `kernel_size`) by default; any ScorerPress works, e.g.
    `scorer=TOVAPress()`. The budgets are segment sizes in the store: memory follows them and a
    new budget vector never recompiles. `profile` (per-layer shares, e.g. from
    `kvjax zigzag-profile`) gives static budgets instead.
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    attention_mass: float = 0.9
    budget_floor_ratio: float = 0.8
    profile: tuple[float, ...] | None = None
    scorer: ScorerPress | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.attention_mass <= 1.0:
            raise ValueError(f"{self.attention_mass=} must be in (0, 1]")
        if not 0.0 <= self.budget_floor_ratio <= 1.0:
            raise ValueError(f"{self.budget_floor_ratio=} must be in [0, 1]")
        if self.profile is not None and (not isinstance(self.profile, tuple)
                                         or min(self.profile) <= 0):
            raise ValueError(f"profile={self.profile!r} must be a tuple of positive shares")
        self.check_scorer()

    def allocator(self) -> ZigZag:
        return ZigZag(compression_ratio=self.compression_ratio, window_size=self.window_size,
                      attention_mass=self.attention_mass,
                      budget_floor_ratio=self.budget_floor_ratio, profile=self.profile)
