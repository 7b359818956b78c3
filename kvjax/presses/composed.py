"""ComposedPress: apply presses one after the other on every layer."""

import dataclasses
import functools

from kvjax.observation import ObsSpec
from kvjax.presses.base import Press


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComposedPress(Press):
    """Chain presses: each compresses what the previous one kept (e.g. SnapKV then ThinK).

    The observation is shared; the kept fraction multiplies.
    """

    presses: tuple[Press, ...]

    def __post_init__(self):
        if not isinstance(self.presses, tuple) or not self.presses:
            raise ValueError(f"presses={self.presses!r} must be a non-empty tuple of presses")
        for p in self.presses:
            if not isinstance(p, Press):
                raise ValueError(f"{p!r} is not a Press")

    @property
    def compression_ratio(self) -> float:
        kept = 1.0
        for p in self.presses:
            kept *= 1.0 - getattr(p, "compression_ratio", 0.0)
        return 1.0 - kept

    @property
    def obs_spec(self):
        return functools.reduce(ObsSpec.merge, (p.obs_spec for p in self.presses), ObsSpec())

    def check_prompt(self, min_prompt_len):
        for p in self.presses:
            p.check_prompt(min_prompt_len)

    def compress_layer(self, layer, obs, ctx):
        for p in self.presses:
            layer = p.compress_layer(layer, obs, ctx)
        return layer
