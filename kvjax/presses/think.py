"""ThinK: query-driven pruning of key (and value) channels (arXiv 2407.21018)."""

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.cache import LayerView
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import Press, WrapperPress, derive_ratio
from kvjax.presses.parts import StaticSize, check_fields
from kvjax.presses.window import window_attention


def kept_channels(n_channels: int, ratio: float) -> int:
    """D - floor(ratio * D) channels survive."""
    return n_channels - math.floor(round(ratio * n_channels, 6))


def key_channel_scores(q_window: jax.Array, window_valid: jax.Array, k: jax.Array,
                       slot_ok: jax.Array) -> jax.Array:
    """ThinK key-channel scores per kv head.

    score[c] = mean_g mean_t q[t, g, c]^2 * mean_s k[s, c]^2, the (scaled) squared Frobenius
    norm of the rank-one logit contribution Q[:, c] K[:, c]^T summed over the group: ranking by
    it is ranking by ||Q[:, c]|| * ||K[:, c]||.

    Args:
      q_window: [B, W, N, H] window queries; window_valid: [B, W].
      k: [B, K, S, H] keys; slot_ok: [B, K, S] valid slots.

    Returns:
      [B, K, H] f32 scores.
    """
    b, w, n, h = q_window.shape
    n_kv = k.shape[1]
    rows = window_valid.astype(jnp.float32)[:, :, None, None]
    q2 = jnp.sum(q_window.astype(jnp.float32) ** 2 * rows, 1) / jnp.maximum(
        jnp.sum(rows, 1), 1.0)  # [B, N, H]
    q2 = q2.reshape(b, n_kv, n // n_kv, h).mean(2)
    s = slot_ok.astype(jnp.float32)[..., None]
    k2 = jnp.sum(k.astype(jnp.float32) ** 2 * s, 2) / jnp.maximum(jnp.sum(s, 2), 1.0)
    return q2 * k2


def value_channel_scores(probs: jax.Array, v: jax.Array) -> jax.Array:
    """Value-channel scores: squared norm of each output channel of the window's attention.

    Dropping value channel c zeroes column c of O = A V exactly, so the window's output error
    is the sum of the dropped columns' squared norms: keeping the top columns is optimal for
    the window queries. score[c] = sum_g ||A_g V[:, c]||^2.

    Args:
      probs: [B, K, G, W, C] window attention over the prefix slots; v: [B, K, C, H].

    Returns:
      [B, K, H] f32.
    """
    out = jnp.einsum("bkgwc,bkch->bkgwh", probs, v.astype(jnp.float32))
    return jnp.sum(out ** 2, axis=(2, 3))


def top_channels(scores: jax.Array, n_keep: int) -> jax.Array:
    """[B, K, H] scores -> [B, K, n_keep] kept channel indices, ascending."""
    idx = jnp.argsort(-scores, axis=-1, stable=True)[..., :n_keep]
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def split_recent(full: LayerView, prompt_len: jax.Array, window: int):
    """The last `window` prompt tokens of an *uncompressed* view (slot t holds position t):
    recent k [B, K, W, H], recent v and their positions [B, W]."""
    rpos = prompt_len[:, None] - window + jnp.arange(window)[None]  # [B, W]
    idx = jnp.broadcast_to(rpos[:, None], full.k.shape[:2] + (window,))
    return select.gather_slots(full.k, idx), select.gather_slots(full.v, idx), rpos


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThinKPress(WrapperPress):
    """ThinK (Xu et al. 2024, arXiv 2407.21018): thinner keys by query-driven channel pruning.

    A channel pruner over any token press. Per layer and kv head, key channels are scored from
    the queries of the last `window_size` prompt positions and the kept keys
    (`key_channel_scores`) and the lowest `floor(key_channel_compression_ratio * H)` are
    dropped: the store holds keys `[.., H - floor(λH)]` plus their channel indices (a column
    of its table). The last `window_size` prompt tokens keep full-width keys (they move to
    the front of the tail), as does every decoded token; decode attention gathers the kept
    query channels for the thin part, scale 1/sqrt(H). `press=SnapKVPress(...)` (or any
    press; last in a ComposedPress) picks the tokens; `value_channel_compression_ratio` also
    drops value channels (`value_channel_scores`). `compression_ratio` is the token press's.
    A `WrapperPress`: it adds its channel pruner (itself), its window to the observation and
    the prompt check, and keeps the window itself when no token press is given; the rest
    forwards to `press`.
    """

    key_channel_compression_ratio: float = 0.4
    window_size: int = 32
    press: Press | None = None
    value_channel_compression_ratio: float = 0.0
    compression_ratio: float | None = None  # the token press's (derive_ratio)

    def __post_init__(self):
        check_fields(self)
        for name in ("key_channel_compression_ratio", "value_channel_compression_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.window_size < 1:
            raise ValueError(f"{self.window_size=} must be >= 1")
        if self.press is not None and not isinstance(self.press, Press):
            raise ValueError(f"press={self.press!r} is not a Press")
        if self.press is not None and self.press.channel_pruner is not None:
            raise ValueError(f"ThinKPress cannot wrap {type(self.press).__name__}: it already "
                             "prunes channels")
        if self.press is not None and self.press.decode_hook is not None:
            raise ValueError(f"ThinKPress cannot wrap {type(self.press).__name__} with "
                             f"{type(self.press.decode_hook).__name__}: decode-time "
                             "re-selection needs full-width keys")
        if self.press is not None and self.press.between_layers is not None:
            raise ValueError(f"ThinKPress cannot wrap {type(self.press).__name__} with "
                             "hidden-state pruning: the recent window must reach every layer")
        derive_ratio(self, 0.0 if self.press is None else self.press.compression_ratio)
        super().__post_init__()

    @property
    def obs_spec(self):
        return ObsSpec(window=self.window_size).merge(super().obs_spec)

    def check_prompt(self, min_prompt_len):
        if min_prompt_len <= self.window_size:
            raise ValueError(f"prompt length {min_prompt_len} must exceed "
                             f"window_size={self.window_size} of ThinKPress")
        super().check_prompt(min_prompt_len)

    @property
    def kept_recent(self) -> int:
        return self.window_size if self.press is None else super().kept_recent

    def pruned_size(self, size: StaticSize, n_kv: int, kept_recent: int) -> StaticSize:
        """Bounds of the store after `prune_layer`, given that the token stages keep the last
        `kept_recent` prompt tokens of every segment whose budget allows: those inside the
        recent window move to the tail, so a budget b >= kept_recent keeps b - moved in the
        store. A smaller budget keeps only some of the protected tokens, any of them: at most
        the `kept_recent - window_size` before the window stay, so a segment bounded by s
        keeps max(s - moved, min(s, kept_recent - window_size)) at most."""
        moved = min(self.window_size, kept_recent)
        if moved == 0:
            return size
        before = kept_recent - moved  # protected tokens before the recent window
        segments = tuple(max(s - moved, min(s, before)) for s in size.segments)
        return StaticSize(segments, min(size.total, n_kv * sum(segments)))

    @property
    def channel_pruner(self):
        no_op = (self.key_channel_compression_ratio == 0
                 and self.value_channel_compression_ratio == 0)
        return None if no_op else self

    def prune_layer(self, kept: LayerView, full: LayerView, obs, ctx):
        """Thin one layer: (view without the recent window, channels set; recent k, v, pos).

        Args:
          kept: what the token stages kept; full: the layer's uncompressed view.
        """
        rk, rv, rpos = split_recent(full, ctx.prompt_len, self.window_size)
        # the token press decided the rest; drop the recent window from its result
        old = (kept.pos < (ctx.prompt_len - self.window_size)[:, None, None]) & (
            jnp.arange(kept.capacity) < kept.length[..., None])
        p = select.compact(kept, old, kept.capacity)
        return self._prune_channels(p, rk, obs, ctx), rk, rv, rpos

    def _prune_channels(self, p: LayerView, rk, obs, ctx) -> LayerView:
        h = p.k.shape[-1]
        slot_ok = jnp.arange(p.capacity) < p.length[..., None]
        all_k = jnp.concatenate([p.k, rk.astype(p.k.dtype)], 2)
        all_ok = jnp.concatenate([slot_ok, jnp.ones(rk.shape[:3], bool)], 2)
        q_w, w_ok = obs.q_window[:, -self.window_size:], obs.window_valid[:, -self.window_size:]
        out = p
        if self.value_channel_compression_ratio > 0:
            probs = window_attention(p, obs, ctx.prompt_len, self.window_size)
            vch = top_channels(value_channel_scores(probs, p.v),
                               kept_channels(p.v.shape[-1], self.value_channel_compression_ratio))
            out = dataclasses.replace(out, v=_take_channels(p.v, vch), value_channels=vch)
        if self.key_channel_compression_ratio > 0:
            n_keep = kept_channels(h, self.key_channel_compression_ratio)
            if n_keep < 1:
                raise ValueError(f"key_channel_compression_ratio="
                                 f"{self.key_channel_compression_ratio} leaves no channel of {h}")
            kch = top_channels(key_channel_scores(q_w, w_ok, all_k, all_ok), n_keep)
            out = dataclasses.replace(out, k=_take_channels(p.k, kch), channels=kch)
        return out


def _take_channels(x: jax.Array, channels: jax.Array) -> jax.Array:
    """x [B, K, C, H], channels [B, K, D'] -> [B, K, C, D']."""
    idx = jnp.broadcast_to(channels[:, :, None, :], x.shape[:3] + (channels.shape[-1],))
    return jnp.take_along_axis(x, idx, axis=-1)
