"""DecodingPress: compress during generation so memory stays bounded on long outputs.

Every `compression_interval` generated tokens each layer's tail is merged into its segments:
the base press scores segment and tail slots together and the best `length` survive, where
`length` is the segment's budget (`kvjax.presses.decode_budget`: by default its size in the
store, over any allocator's table: uniform, PyramidKV, AdaKV, ZigZagKV, UNComp). Runs inside
the jitted decode loop (`lax.cond`), with no recompilation; the tail only needs
`compression_interval` slots.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale, group_heads, tail_mask, window_ok
from kvjax.buckets import bucket_length
from kvjax.cache import (KVCache, KVStore, LayerView, Tail, gather_rows, layer_view, scatter_rows,
                         slot_index, write_tail, write_view)
from kvjax.hooks import DecodeHook
from kvjax.presses.decode_scores import decode_scores
from kvjax.presses.decode_budget import (BUDGETS, FixedSize, KeepSize, RatioOfSeen,
                                         ScoreThreshold)
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import LayerContext, ScorerPress
from kvjax.presses.parts import check_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingPress(DecodeHook):
    """Periodic re-selection over each segment + the tail.

    Args:
      press: the scorer (`kvjax.presses.decode_scores`): query-free (KnormPress,
        StreamingLLMPress, RandomPress, KeyDiffPress), hidden-state (KVzapPress: every token
        scored once from its own hidden state) or attention (TOVAPress: the newest query's
        attention; ObservedAttentionPress: H2O's running sums), from the decode step itself.
      compression_interval: generated tokens between merges (the tail's capacity).
      budget: what each (layer, kv head) keeps after a merge (`kvjax.presses.decode_budget`):
        `KeepSize()` (the default: the size the prefill gave it), `FixedSize(n)` (kvpress's
        target_size), `RatioOfSeen(r)` ((1 - r) of the tokens processed so far) or
        `ScoreThreshold(t)` (scorers on a log scale: KVzap). Growing budgets get their room
        in the store when the prompt is compressed.
      window_size: the most recent tokens every merge keeps whatever their score.
    """

    press: ScorerPress
    compression_interval: int = 64
    budget: KeepSize | FixedSize | RatioOfSeen | ScoreThreshold = KeepSize()
    window_size: int = 0

    def __post_init__(self):
        check_fields(self)
        decode_scores(self.press)  # refuses a press it cannot score with
        if self.compression_interval < 1:
            raise ValueError(f"{self.compression_interval=} must be >= 1")
        if not isinstance(self.budget, BUDGETS):
            raise ValueError(f"budget={self.budget!r} must be one of "
                             f"{', '.join(b.__name__ for b in BUDGETS)} "
                             "(kvjax.presses.decode_budget)")
        if isinstance(self.budget, ScoreThreshold) and self.press.score_scale != "log":
            raise ValueError(f"{type(self.press).__name__} scores have no calibrated scale, so "
                             f"{self.budget} means nothing: a decode threshold needs log "
                             "scores (KVzapPress)")
        least = self.budget.least()
        protected = self.n_sink + self.window_size
        if least is not None and least < protected:
            raise ValueError(f"{self.budget} is below the {self.n_sink} sinks plus the "
                             f"{self.window_size=} that every merge keeps ({protected})")

    @property
    def scores(self):
        return decode_scores(self.press)

    @property
    def n_sink(self) -> int:
        """Entries the scorer always keeps at the start (StreamingLLM's sinks), 0 if none."""
        return int(getattr(self.press, "n_sink", 0))

    @property
    def obs_spec(self):
        return self.press.obs_spec if self.scores.stateful else ObsSpec()

    @property
    def needs_extra(self):
        return self.scores.stateful

    @property
    def tail_state(self):
        return self.scores.stateful

    @property
    def scores_hidden(self):
        return self.scores.from_hidden

    @property
    def owns_attention(self):
        return self.scores.from_attention

    @property
    def attachable(self):
        return not self.scores.stateful and isinstance(self.budget, KeepSize)

    def tail_slots(self, out_len, reserved):
        return bucket_length(self.compression_interval + reserved, minimum=16)

    def segment_room(self, width, seen_bound):
        return self.budget.room(width, seen_bound)

    def init_extra(self, full, obs, idx, length, ctx):
        """Per-slot state [B, K, M, 1]: the kept prompt slots' scores (0 past length)."""
        s = self.scores.initial(full, obs, idx, ctx)
        return jnp.where(jnp.arange(idx.shape[-1]) < length[..., None], s, 0.0)[..., None]

    def write_hidden_scores(self, cache, layer, hidden, positions, start):
        s = self.scores.new_tokens(hidden, positions, layer, cache.n_layers,
                                   cache.store.n_kv_heads)  # [B, K, T]
        return dataclasses.replace(cache, tail=put_tail_score(cache.tail, layer, s, start))

    def decode_layer(self, q, k, v, positions, n_new, cache, layer, *, sliding_window=None,
                     scale=None):
        """Attention over the segments and the tail that also updates the per-slot scores
        (attention scorers): the tokens go to the tail as usual."""
        start = cache.tail.count - n_new.astype(jnp.int32)
        tail = write_tail(cache.tail, layer, k, v, start)
        out, p_seg, p_tail = attention_with_probs(q, positions, cache.store, layer,
                                                  tail.layer(layer), scale=scale,
                                                  sliding_window=sliding_window)
        real = jnp.arange(q.shape[1])[None, :] < n_new[:, None]
        store = cache.store
        idx, ok = slot_index(store, layer, store.max_segment)
        seg = self.scores.update(gather_rows(store.extra, idx)[..., 0], p_seg, real)
        store = dataclasses.replace(store, extra=scatter_rows(store.extra, idx, ok,
                                                              seg[..., None]))
        t_score = self.scores.update(tail.score[layer], p_tail, real)
        tail = dataclasses.replace(tail, score=tail.score.at[layer].set(t_score))
        return out, dataclasses.replace(cache, store=store, tail=tail)

    def candidates(self, cache: KVCache, layer):
        """Layer `layer`'s segment and tail slots, valid ones first -> (view [B, K, M + S],
        the segment's view, their per-slot state [B, K, M + S] or None)."""
        store, t = cache.store, cache.tail.layer(layer)
        p = layer_view(store, layer)
        count = jnp.minimum(t.count, t.capacity)
        pos_t = jnp.broadcast_to(t.pos[:, None], t.k.shape[:3])
        valid = jnp.concatenate([jnp.arange(p.capacity) < p.length[..., None],
                                 jnp.broadcast_to(jnp.arange(t.capacity) < count[:, None, None],
                                                  pos_t.shape)], axis=2)
        joined = LayerView(k=jnp.concatenate([p.k, t.k.astype(p.k.dtype)], 2),
                           v=jnp.concatenate([p.v, t.v.astype(p.v.dtype)], 2),
                           pos=jnp.concatenate([p.pos, pos_t], 2), length=p.length)
        # valid candidates first (segment, then tail), so `length` means what it says
        idx, n = select.kept_indices(valid, joined.capacity)
        both = select.compact(joined, valid, joined.capacity)
        state = None
        if self.scores.stateful:
            seg = gather_rows(store.extra, slot_index(store, layer, p.capacity)[0])[..., 0]
            state = jnp.take_along_axis(jnp.concatenate([seg, t.score], 2), idx, axis=2)
        return both, p, state

    def merge_layer(self, cache: KVCache, layer) -> KVCache:
        """Merge layer `layer`'s tail into its segments, keeping each segment's budget."""
        both, p, state = self.candidates(cache, layer)
        ctx = LayerContext(prompt_len=cache.next_pos, layer_idx=layer,
                           n_layers=cache.n_layers)
        scores = self.scores.merge_scores(both, state, ctx)
        recent = both.pos >= (cache.next_pos - self.window_size)[:, None, None]
        scores = select.mask_invalid(jnp.where(recent, jnp.inf, scores), both.length)
        n = jnp.minimum(self.budget.keep(p.length, both.length, cache.next_pos, scores),
                        p.capacity)
        mask = select.topk_mask(scores, n, p.capacity)
        kept = select.compact(both, mask, p.capacity)
        extra = None
        if state is not None:
            idx, _ = select.kept_indices(mask, p.capacity)
            extra = jnp.take_along_axis(state, idx, axis=2)[..., None]
        return dataclasses.replace(cache, store=write_view(cache.store, layer, kept, extra,
                                                           resize=True))

    def merge(self, cache: KVCache) -> KVCache:
        """Merge every layer and empty the tail."""
        cache = jax.lax.fori_loop(0, cache.n_layers, lambda l, c: self.merge_layer(c, l), cache)
        tail = cache.tail
        tail = dataclasses.replace(tail, count=jnp.zeros_like(tail.count),
                                   score=None if tail.score is None else jnp.zeros_like(
                                       tail.score))
        return dataclasses.replace(cache, tail=tail)

    def after_step(self, cache: KVCache) -> KVCache:
        """Merge when the tail holds `compression_interval` tokens (lax.cond)."""
        full = jnp.max(cache.tail.count) >= self.compression_interval
        return jax.lax.cond(full, self.merge, lambda c: c, cache)


def put_tail_score(tail: Tail, layer, s: jax.Array, start: jax.Array) -> Tail:
    """The tail with scores s [B, K, T] of layer `layer` at slots [start, start + T)."""
    b, n_kv, t = s.shape
    slot = (start[:, None] + jnp.arange(t))[:, None, :]
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None]
    return dataclasses.replace(tail, score=tail.score.at[layer, bi, hi, slot].set(
        s, mode="drop"))


def attention_with_probs(q, q_pos, store: KVStore, layer, tail: Tail, *, scale=None,
                         sliding_window=None):
    """One softmax over layer `layer`'s segments and its tail, returning the probabilities.

    Args:
      q: [B, T, N, H] post-RoPE queries at q_pos [B, T]; tail: the layer's tail (the new
        tokens already in it).

    Returns:
      out [B, T, N, H], probabilities over the segment slots [B, K, G, T, M] and over the
      tail slots [B, K, G, T, S].
    """
    b, t, n, h = q.shape
    scale = default_scale(h) if scale is None else scale
    view = layer_view(store, layer)
    qg = group_heads(q, store.n_kv_heads)  # [B, T, K, G, H]
    m = view.capacity
    seg_ok = (jnp.arange(m) < view.length[..., None])[:, :, None, None, :]
    seg_ok = seg_ok & window_ok(q_pos[:, None, None, :, None], view.pos[:, :, None, None, :],
                                sliding_window)
    lead = (b, store.n_kv_heads, qg.shape[3], t)
    ok = jnp.concatenate([jnp.broadcast_to(seg_ok, lead + (m,)),
                          jnp.broadcast_to(tail_mask(q_pos, tail, sliding_window),
                                           lead + (tail.capacity,))], axis=-1)
    keys = jnp.concatenate([view.k.astype(jnp.float32), tail.k.astype(jnp.float32)], 2)
    vals = jnp.concatenate([view.v.astype(jnp.float32), tail.v.astype(jnp.float32)], 2)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg.astype(jnp.float32), keys) * scale
    logits = jnp.where(ok, logits, -jnp.inf)
    probs = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, -1e30), axis=-1), 0.0)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, vals).reshape(b, t, n, -1).astype(q.dtype)
    return out, probs[..., :m], probs[..., m:]
