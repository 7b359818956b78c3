"""KeyDiff: keep the keys least similar to the mean key direction (arXiv 2504.15364)."""

import dataclasses

import jax.numpy as jnp

from kvjax.presses.base import ScorerPress


def keydiff_scores(k, length):
    """-cos(k, anchor) per slot, the anchor being the mean unit key over the valid slots.

    Args:
      k: [B, K, C, H] keys; length: [B, K] valid slots (slots >= length are padding).

    Returns:
      [B, K, C] f32 scores (higher = more distinctive = keep).
    """
    k = k.astype(jnp.float32)
    valid = (jnp.arange(k.shape[2]) < length[..., None])[..., None]  # [B, K, C, 1]
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    anchor = jnp.sum(jnp.where(valid, unit, 0.0), axis=2, keepdims=True) / jnp.maximum(
        length[..., None, None], 1).astype(jnp.float32)
    cos = jnp.sum(k * anchor, -1) / jnp.maximum(
        jnp.linalg.norm(k, axis=-1) * jnp.linalg.norm(anchor, axis=-1), 1e-8)
    return -cos


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDiffPress(ScorerPress):
    """KeyDiff (Park et al. 2025, arXiv 2504.15364), single-shot as kvpress's KeyDiffPress.

    A token's score is minus the cosine similarity of its key with the anchor, the mean of the
    layer's unit keys (per kv head, post-RoPE): keys pointing away from the common direction
    are kept. Query-free, so it also serves `DecodingPress`.
    """

    def score(self, prefix, obs, ctx):
        return keydiff_scores(prefix.k, prefix.length)
