"""Hidden-state token pruning during prefill: a between-layers hook (UNComp, arXiv 2410.03090).

kvjax hands the hook to the decoder (`fn.prefill(..., between=hook)`); the decoder splits its
layer scan where the hook prunes and calls it there with the residual stream and the previous
layer's prompt output. The model itself runs no press code.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.parts import check_fields
from kvjax.presses.window import window_attention
from kvjax.prompt import LayerPrompt, PromptGroup


@dataclasses.dataclass(frozen=True)
class HiddenPruning:
    """Before layer i, keep the `keep[i]` tokens the last `window` queries of layer i - 1
    attended to most (summed over heads and window rows); the last `window` tokens always
    survive and original positions are kept (RoPE, cache positions).

    Attributes:
      keep: per layer the number of tokens entering it, or None to keep what arrives
        (static; keep[0] must be None).
      window: W of the importance scores.
    """

    keep: tuple[int | None, ...]
    window: int = 8

    def __post_init__(self):
        check_fields(self)
        if self.window < 1:
            raise ValueError(f"{self.window=} must be >= 1")
        if not isinstance(self.keep, tuple) or not self.keep:
            raise ValueError(f"keep={self.keep!r} must be a non-empty tuple")
        if self.keep[0] is not None:
            raise ValueError("prefill_keep[0] must be None (layer 0 has no previous attention)")
        if any(k is not None and k < self.window for k in self.keep):
            raise ValueError(f"prefill_keep {self.keep} keeps fewer tokens than the "
                             f"prune_window={self.window}")

    @property
    def obs_spec(self) -> ObsSpec:
        return ObsSpec(window=self.window)

    def check(self, n_layers: int, sliding_window: int | None) -> None:
        """Raise ValueError unless the hook fits a model (called by the decoder)."""
        if len(self.keep) != n_layers:
            raise ValueError(f"prefill_keep has {len(self.keep)} entries for {n_layers} layers")
        if sliding_window is not None:
            raise ValueError("hidden-state pruning needs full attention (no sliding window)")

    def check_obs(self, obs_spec: ObsSpec) -> None:
        """Raise ValueError when a press observes what pruning may have removed: more than
        the last `window` queries, proxy rows, column sums or every token's hidden state."""
        if (obs_spec.window > self.window or obs_spec.proxy_ratio or obs_spec.column_sums
                or obs_spec.hidden):
            raise ValueError(f"with hidden-state pruning a press may observe at most the last "
                             f"prune_window={self.window} queries; got {obs_spec}")

    def starts(self, n_tokens: int) -> tuple[int, ...]:
        """Layers before which tokens are pruned, for a prompt padded to `n_tokens` (static)."""
        out, cur = [], n_tokens
        for i, k in enumerate(self.keep):
            if k is not None and k < cur:
                out.append(i)
                cur = k
        return tuple(out)

    def __call__(self, layer: int, h: jax.Array, positions: jax.Array, lengths: jax.Array,
                 prev: LayerPrompt) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Prune before layer `layer`.

        Args:
          h: [B, T, D] residual stream; positions: [B, T] original positions; lengths: [B];
          prev: the previous layer's LayerPrompt (k [B, K, T, H], its observation).

        Returns:
          h [B, keep, D], positions [B, keep] (ascending originals), lengths [B].
        """
        view = PromptGroup(layers=jax.tree.map(lambda x: x[None], prev), positions=positions,
                           lengths=lengths).views()
        view = jax.tree.map(lambda x: x[0], view)
        probs = window_attention(view, prev.obs, lengths, self.window)  # [B, K, G, W, C]
        return prune_tokens(h, positions, lengths, jnp.sum(probs, axis=(1, 2, 3)),
                            self.keep[layer], self.window)


def prune_tokens(h: jax.Array, positions: jax.Array, lengths: jax.Array,
                 importance: jax.Array, keep: int, window: int):
    """Keep the `keep` most important valid tokens per row (the last `window` always).

    Returns h [B, keep, D], positions [B, keep] (ascending originals) and lengths [B].
    """
    slot = jnp.arange(h.shape[1])[None]
    recent = slot >= (lengths - window)[:, None]
    score = jnp.where(slot < lengths[:, None], jnp.where(recent, jnp.inf, importance), -jnp.inf)
    n_keep = jnp.minimum(keep, lengths).astype(jnp.int32)
    mask = select.topk_mask(score[:, None], n_keep[:, None], keep)
    idx = select.kept_indices(mask, keep)[0][:, 0]  # [B, keep]
    return (jnp.take_along_axis(h, idx[:, :, None], axis=1),
            jnp.take_along_axis(positions, idx, axis=1), n_keep)
