"""ComposedPress: apply presses one after the other."""

import dataclasses
import functools
import math

from kvjax.observation import ObsSpec
from kvjax.presses.base import Press, derive_ratio


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComposedPress(Press):
    """Chain presses: each token stage compresses what the previous one kept (e.g. SnapKV
    then KNorm); a channel pruner (ThinK) may come last. The observation is shared; the kept
    fraction multiplies (`compression_ratio` is derived). At most one press may bring a
    decode hook and at most one a between-layers hook.
    """

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
        for hook in ("decode_hook", "between_layers", "prompt_observer"):
            owners = [type(p).__name__ for p in self.presses if getattr(p, hook) is not None]
            if len(owners) > 1:
                raise ValueError(f"{' and '.join(owners)} both bring a {hook}: compose at most "
                                 "one of them")
        if self.between_layers is not None:
            self.between_layers.check_obs(self.obs_spec)
        kept = math.prod(1.0 - p.compression_ratio for p in self.presses)
        derive_ratio(self, 1.0 - kept)
        super().__post_init__()

    @property
    def obs_spec(self):
        return functools.reduce(ObsSpec.merge, (p.obs_spec for p in self.presses), ObsSpec())

    def check_prompt(self, min_prompt_len):
        for p in self.presses:
            p.check_prompt(min_prompt_len)

    def stages(self):
        return tuple(s for p in self.presses for s in p.stages())

    @property
    def channel_pruner(self):
        return self.presses[-1].channel_pruner

    @property
    def kept_recent(self) -> int:
        """Each token stage selects from the previous one's entries: the window survives only
        as far as every selecting press keeps it (no selecting press: every token is kept)."""
        return min((p.kept_recent for p in self.presses if p.stages()), default=1 << 30)

    def capacity(self, prompt, n_kv):
        size = super().capacity(prompt, n_kv)
        pruner = self.channel_pruner
        return size if pruner is None else pruner.pruned_size(size, n_kv, self.kept_recent)

    @property
    def decode_hook(self):
        return next((p.decode_hook for p in self.presses if p.decode_hook is not None), None)

    @property
    def between_layers(self):
        return next((p.between_layers for p in self.presses if p.between_layers is not None),
                    None)

    @property
    def prompt_observer(self):
        return next((p.prompt_observer for p in self.presses
                     if p.prompt_observer is not None), None)

    def with_tokenizer(self, tokenizer):
        return dataclasses.replace(self, presses=tuple(p.with_tokenizer(tokenizer)
                                                       for p in self.presses))
