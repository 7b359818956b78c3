"""NACL: proxy-token eviction plus random eviction, one shot at the end of encoding
(Chen et al., ACL 2024, arXiv 2408.03675).

Scorer: the attention the last P prompt queries (the proxy tokens) pay to every token, summed
over proxy rows and averaged over the query heads of each kv group (`group_scores`).
Selector (per layer and kv head): sinks and the most recent tokens are kept; from the other
candidates the `proxy` best by score, then `random` more sampled without replacement with
probability softmax(score) over the candidates left (Gumbel-top-k).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import ScorerPress
from kvjax.presses.parts import (LayerwiseAllocator, Selector, Stage, StaticSize, Uniform,
                                 static_budget_max)
from kvjax.presses.proxy import DEFAULT_CHUNK, proxy_scores_reference
from kvjax.presses.window import pool1d

_OFFICIAL = ("token_protect_ratio", "proxy_keep_ratio", "random_keep_ratio")
GQA_MODES = ("mean", "sum", "first")


def proxy_count(prompt_len, ratio: float, xp=jnp):
    """P = max(1, round(ratio * T)) proxy rows (f32, round half to even) for lengths T."""
    t = xp.asarray(prompt_len)
    return xp.maximum(xp.round(xp.float32(ratio) * t.astype(xp.float32)), 1).astype(xp.int32)


def group_scores(s: jax.Array, n_kv: int, mode: str) -> jax.Array:
    """Per-kv-head scores [B, K, C] from per-query-head proxy scores s [B, N, C].

    "mean": the mean over the G = N // K query heads of each kv group (one head's scale, so
    the random share's softmax has the official per-head temperature); "sum": their sum (the
    same ranking, a G times sharper softmax); "first": kv head j takes query head j (the
    official code's flash-attention path indexes its per-query-head scores with the kv-head
    index, so every kv head reads a head of group 0).
    """
    b, n, c = s.shape
    if mode == "first":
        return s[:, :n_kv]
    g = s.reshape(b, n_kv, n // n_kv, c)
    return g.mean(axis=2) if mode == "mean" else g.sum(axis=2)


def layer_key(seed: int, layer_idx: int) -> jax.Array:
    """The layer's PRNG key, fold_in(key(seed), layer_idx); heads fold in their index next."""
    return jax.random.fold_in(jax.random.key(seed), layer_idx)


def gumbel_noise(key: jax.Array, pos: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise [B, K, C] for tokens at positions pos [B, K, C].

    The noise of token t in kv head h is drawn from fold_in(fold_in(key, h), t): independent
    across layers and heads, and the same whatever the batch composition or padding.
    """
    def one_head(h, pos_h):  # pos_h [B, C]
        kh = jax.random.fold_in(key, h)

        def draw(t):
            return jax.random.gumbel(jax.random.fold_in(kh, t))

        return jax.vmap(jax.vmap(draw))(pos_h)

    return jax.vmap(one_head, in_axes=(0, 1), out_axes=1)(jnp.arange(pos.shape[1]), pos)


def protected_mask(length: jax.Array, sinks: jax.Array, recent: jax.Array, c: int) -> jax.Array:
    """[B, K, C] True for the first `sinks` and the last `recent` of the `length` valid slots."""
    slot = jnp.arange(c)
    n = length[..., None]
    return (slot < jnp.minimum(sinks, length)[..., None]) | (
        (slot >= (n - recent[..., None])) & (slot < n))


def hybrid_select(scores: jax.Array, length: jax.Array, split, noise: jax.Array,
                  capacity: int) -> jax.Array:
    """NACL's selector: boolean keep mask [B, K, C] (exactly the sum of `split` per row).

    Args:
      scores: [B, K, C] proxy scores (finite on valid slots); length: [B, K] valid slots.
      split: (sinks, recent, proxy, random), each [B, K] int32, with sinks + recent + proxy +
        random <= length: slots < sinks and the last `recent` valid slots are kept; then the
        `proxy` best candidates by score (ties to the earlier slot); then `random` more by
        Gumbel-top-k, a sample without replacement with p = softmax(score) over the rest.
      noise: [B, K, C] Gumbel(0, 1) noise; capacity: static bound on the kept count.
    """
    sinks, recent, n_proxy, n_random = split
    c = scores.shape[-1]
    protected = protected_mask(length, sinks, recent, c)
    cand = (jnp.arange(c) < length[..., None]) & ~protected
    top = select.topk_mask(jnp.where(cand, scores, -jnp.inf), n_proxy, capacity)
    rest = jnp.where(cand & ~top, scores + noise, -jnp.inf)
    return protected | top | select.topk_mask(rest, n_random, capacity)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NACLPress(ScorerPress):
    """NACL (Chen et al., ACL 2024, arXiv 2408.03675): proxy-token + random eviction.

    Each token is scored by the softmax attention the last P = max(1, round(ratio * T))
    prompt queries pay to it (summed over proxy rows, combined over the query heads of its kv group
    by `gqa`; causal, or non-causal as the official code). Per kv head: sinks and recent tokens are
    kept, the best-scored candidates, and random extra ones sampled without replacement
    with p = softmax(score). Randomness: layer l, kv head h, token t draws from
    fold_in(fold_in(fold_in(key(seed), l), h), t).

    Budgets, two forms:
    * kvpress form (default): keeps ceil((1 - compression_ratio) * n) of n tokens: n_sink
      sinks and round(recent_ratio * n) recent (both clipped to the budget), and of the rest
      round(random_fraction * rest) random, the others by score.
    * official form (`NACLPress.official()`, set all of token_protect_ratio,
      proxy_keep_ratio, random_keep_ratio): n_sink sinks, max(0, int(token_protect_ratio *
      n) - n_sink) recent, int(proxy_keep_ratio * n) by score, int(random_keep_ratio * n)
      random (the official code's int() floors; the official code fails when the recent
      count is not positive, here it is clipped to 0).
    Documented no-op: a row of n <= min_eviction_length tokens, or whose sinks + recent +
    budgets reach n, is kept whole (so `capacity` may exceed the kvpress count). Counts use
    f32 arithmetic, identically in jit and on the host.

    GQA (`gqa`): the paper is written for multi-head attention. Default "first": the official
    code's flash-attention path (kv head j ranks by query head j, so every kv head reads a
    head of group 0), which beats SnapKV at equal bytes in every measured cell (docs/nacl.md).
    "mean" (the earlier default: each kv group's own query heads averaged, the random
    share's softmax at one head's temperature) and "sum" (same ranking, G times sharper
    softmax) remain options.

    Options that are not NACL's defaults (docs/nacl.md has the ablations):
      proxy_tokens: > 0: the proxies are exactly the last `proxy_tokens` prompt tokens (the
        question's tokens when the question ends the prompt: the paper's proxy choice), instead
        of round(proxy_tokens_ratio * T) (the official code's).
      kernel_size: > 1: avg-pool the proxy scores along tokens (SnapKV's smoothing, not in
        NACL), so the neighbours of a peak (the other digits of a number) are kept with it.
      question_proxies: the proxies are the question's own tokens whenever the caller knows
        them (`Pipeline.run(question_aware=True)` passes the span as
        `Observation.question_len`), else as `proxy_tokens` / `proxy_tokens_ratio` say.

    Attributes (besides compression_ratio and the budget fields above):
      proxy_tokens_ratio: P = max(1, round(ratio * T)) proxy rows (round half to even).
      causal: proxy rows see only earlier keys; False as the official code (all keys).
      seed: int root of the PRNG streams; min_eviction_length: see the no-op above.
      chunk_size: key chunk of the two-pass proxy scores.
    """

    random_fraction: float = 0.35
    proxy_tokens_ratio: float = 0.01
    n_sink: int = 4
    recent_ratio: float = 0.01
    causal: bool = True
    seed: int = 0
    min_eviction_length: int = 0
    token_protect_ratio: float | None = None
    proxy_keep_ratio: float | None = None
    random_keep_ratio: float | None = None
    chunk_size: int = DEFAULT_CHUNK
    gqa: str = "first"
    proxy_tokens: int = 0
    kernel_size: int = 1
    question_proxies: bool = False

    @classmethod
    def official(cls, seed: int = 0, **overrides) -> "NACLPress":
        """The official code's defaults (InfiniteBench, Llama-3.1-8B): about 80% evicted."""
        kw = dict(proxy_tokens_ratio=0.01, n_sink=256, token_protect_ratio=0.01,
                  proxy_keep_ratio=0.12, random_keep_ratio=0.07, min_eviction_length=2048,
                  causal=False, gqa="first", seed=seed)
        return cls(**{**kw, **overrides})

    def __post_init__(self):
        super().__post_init__()
        for name in ("random_fraction", "recent_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 < self.proxy_tokens_ratio <= 1.0:
            raise ValueError(f"{self.proxy_tokens_ratio=} must be in (0, 1]")
        if self.chunk_size < 1:
            raise ValueError(f"{self.chunk_size=} must be >= 1")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa={self.gqa!r} is not one of {GQA_MODES}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size!r} must be a positive odd int")
        if self.compression_ratio + self.recent_ratio > 1.0:
            raise ValueError(f"{self.compression_ratio=} + {self.recent_ratio=} sum above 1")
        self._check_official()

    def _check_official(self):
        given = [getattr(self, name) is not None for name in _OFFICIAL]
        if any(given) and not all(given):
            raise ValueError(f"set all of {_OFFICIAL} (the official form) or none")
        if not all(given):
            return
        if self.compression_ratio:
            raise ValueError(f"{self.compression_ratio=}: use either compression_ratio or "
                             f"the official keep ratios {_OFFICIAL}, not both")
        values = [getattr(self, name) for name in _OFFICIAL]
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"{dict(zip(_OFFICIAL, values))} must each be in [0, 1]")
        if sum(values) > 1.0:
            raise ValueError(f"{dict(zip(_OFFICIAL, values))} sum above 1")

    @property
    def official_form(self) -> bool:
        return self.proxy_keep_ratio is not None

    @property
    def obs_spec(self):
        spec = ObsSpec(window=self.proxy_tokens) if self.proxy_tokens else ObsSpec(
            proxy_ratio=self.proxy_tokens_ratio)
        return spec.merge(ObsSpec(question=True)) if self.question_proxies else spec

    def proxy_rows(self, prompt_len: jax.Array, obs=None) -> jax.Array:
        """[B] proxy rows per sequence: the question's tokens (`question_proxies` and a known
        span, at least 1), else `proxy_tokens` (at most T), else round(ratio * T)."""
        if self.question_proxies and obs is not None and obs.question_len is not None:
            return jnp.clip(obs.question_len, 1, prompt_len).astype(jnp.int32)
        if self.proxy_tokens:
            return jnp.minimum(prompt_len, self.proxy_tokens).astype(jnp.int32)
        return proxy_count(prompt_len, self.proxy_tokens_ratio)

    def split(self, n, xp=jnp, keep=None):
        """(sinks, recent, proxy, random) kept for rows of n valid slots, int32 each.

        `keep` (jnp only) is the row's budget when an allocator other than NACL's own sets it
        (default: ceil((1 - r) n), or the official counts). Rows kept whole (the documented
        no-op) get (n, 0, 0, 0).
        """
        n = xp.asarray(n).astype(xp.int32)
        nf = n.astype(xp.float32)
        if self.official_form:
            def floor(r):
                return xp.floor(xp.float32(r) * nf).astype(xp.int32)

            sinks = xp.minimum(n, self.n_sink)
            recent = xp.maximum(floor(self.token_protect_ratio) - self.n_sink, 0)
            n_proxy, n_random = floor(self.proxy_keep_ratio), floor(self.random_keep_ratio)
            if keep is not None:  # another allocator's budget: the same shares of it
                sinks, recent = jnp.minimum(sinks, keep), jnp.minimum(recent, keep - sinks)
                rest = keep - sinks - recent
                share = self.random_keep_ratio / max(
                    self.proxy_keep_ratio + self.random_keep_ratio, 1e-9)
                n_random = jnp.round(jnp.float32(share) * rest).astype(jnp.int32)
                n_proxy = rest - n_random
        else:  # jnp only: the kept total is the generic ceil((1 - r) * n)
            keep = select.ceil_keep(n, self.compression_ratio) if keep is None else keep
            sinks = jnp.minimum(keep, self.n_sink)
            recent = jnp.round(jnp.float32(self.recent_ratio) * nf).astype(jnp.int32)
            recent = jnp.minimum(recent, keep - sinks)
            rest = keep - sinks - recent
            n_random = jnp.round(jnp.float32(self.random_fraction) * rest).astype(jnp.int32)
            n_proxy = rest - n_random
        whole = (n <= self.min_eviction_length) | (sinks + recent + n_proxy + n_random >= n)
        zero = xp.zeros_like(n)
        return (xp.where(whole, n, sinks), xp.where(whole, zero, recent),
                xp.where(whole, zero, n_proxy), xp.where(whole, zero, n_random))

    def allocator(self):
        if not self.official_form and self.min_eviction_length == 0:
            return Uniform(compression_ratio=self.compression_ratio)
        return NACLBudget(press=self)  # rows kept whole exceed the uniform budget

    def selector(self):
        return HybridSelector(press=self)

    def stages(self):
        if not self.official_form and self.compression_ratio == 0:
            return ()
        return (Stage(scorer=self, allocator=self.allocator(), selector=self.selector()),)

    def proxy_scores(self, prefix, obs, ctx):
        """[B, K, C] f32 proxy scores per kv head (`gqa`), avg-pooled when kernel_size > 1."""
        if obs.q_window is None:
            raise ValueError("NACLPress needs the proxy queries: prefill with its obs_spec")
        if prefix.channels is not None:
            raise ValueError("NACLPress needs full-width keys: apply it before channel pruning")
        w = obs.q_window.shape[1]
        need = self.proxy_tokens or int(proxy_count(prefix.capacity, self.proxy_tokens_ratio,
                                                    np))
        if self.question_proxies and obs.question_len is not None:
            need = 1  # the plan widened the window to the question's bucket
        if w < need:
            raise ValueError(f"observation window {w} holds fewer rows than the {need} proxy "
                             f"tokens of {self}: prefill with this press's obs_spec")
        t = ctx.prompt_len
        q_pos = t[:, None] - w + jnp.arange(w)[None, :]  # [B, W]
        rows = obs.window_valid & (q_pos >= (t - self.proxy_rows(t, obs))[:, None])
        s = proxy_scores_reference(obs.q_window, q_pos, rows, prefix.k, prefix.pos,
                                   prefix.length, causal=self.causal, chunk=self.chunk_size)
        s = group_scores(s, prefix.k.shape[1], self.gqa)
        return pool1d(s, self.kernel_size, "avg")

    def score(self, prefix, obs, ctx):
        """Proxy scores with the protected slots at +inf: top-k of it is NACL without random."""
        sinks, recent, _, _ = self.split(prefix.length)
        protected = protected_mask(prefix.length, sinks, recent, prefix.capacity)
        return jnp.where(protected, jnp.inf, self.proxy_scores(prefix, obs, ctx))



@dataclasses.dataclass(frozen=True)
class NACLBudget(LayerwiseAllocator):
    """NACL's official budgets: sinks + recent + proxy + random counts of `press.split`."""

    press: NACLPress

    def layer_budgets(self, n_valid, layer_idx, n_layers):
        return jnp.minimum(sum(self.press.split(n_valid)), n_valid)

    def _static(self, seg: int) -> int:
        p = self.press
        if not p.official_form:  # whole rows up to min_eviction_length, else ceil((1 - r) n)
            return max(min(seg, p.min_eviction_length),
                       select.ceil_keep_static(seg, p.compression_ratio))
        return static_budget_max(lambda n: sum(p.split(n, np)), seg)

    def capacity(self, size, n_kv):
        segs = tuple(self._static(seg) for seg in size.segments)
        return StaticSize(segs, min(size.total, n_kv * sum(segs)))


@dataclasses.dataclass(frozen=True)
class HybridSelector(Selector):
    """NACL's selector (`hybrid_select`): sinks, recent, the best by proxy score, and random
    extra ones by Gumbel-top-k; the counts are `press.split` of the budget."""

    press: NACLPress

    def select(self, scores, n_keep, view, obs, ctx, capacity):
        split = self.press.split(view.length, keep=n_keep)
        noise = gumbel_noise(layer_key(self.press.seed, ctx.layer_idx), view.pos)
        return hybrid_select(scores, view.length, split, noise, capacity)
