"""ComposedPress: apply presses one after the other."""

import dataclasses
import math

from kvjax.presses.base import Press, WrapperPress, check_hooks, derive_ratio


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComposedPress(WrapperPress):
    """Chain presses: each token stage compresses what the previous one kept (e.g. SnapKV
    then KNorm); a channel pruner (ThinK) may come last. The observation is shared; the kept
    fraction multiplies (`compression_ratio` is derived). At most one press may bring a
    decode hook and at most one a between-layers hook.

    A `WrapperPress` over `presses`: observations merged, every prompt check, stages chained,
    the last press's channel pruner, each hook from the one press that brings it; only
    `kept_recent` is its own.
    """

    wraps = "presses"

    presses: tuple[Press, ...]
    compression_ratio: float | None = None  # derived from the presses (derive_ratio)

    def __post_init__(self):
        if not isinstance(self.presses, tuple) or not self.presses:
            raise ValueError(f"presses={self.presses!r} must be a non-empty tuple of presses")
        for i, p in enumerate(self.presses):
            if not isinstance(p, Press):
                raise ValueError(f"{p!r} is not a Press")
            if p.channel_pruner is not None and i != len(self.presses) - 1:
                raise ValueError(f"{type(p).__name__} prunes channels: it must come last in a "
                                 "ComposedPress (token stages select full-width keys)")
        check_hooks(self.presses)
        if self.between_layers is not None:
            self.between_layers.check_obs(self.obs_spec)
        kept = math.prod(1.0 - p.compression_ratio for p in self.presses)
        derive_ratio(self, 1.0 - kept)
        super().__post_init__()

    @property
    def kept_recent(self) -> int:
        """Each token stage selects from the previous one's entries: the window survives only
        as far as every selecting press keeps it (no selecting press: every token is kept)."""
        return min((p.kept_recent for p in self.presses if p.stages()), default=1 << 30)
