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
        for i, p in enumerate(self.presses):
            if not isinstance(p, Press):
                raise ValueError(f"{p!r} is not a Press")
            if _is_uncomp(p) and i != len(self.presses) - 1:
                raise ValueError("a UNCompPress must come last in a ComposedPress (it stores "
                                 "kv-head groups as separate arrays)")
            if _is_channel_pruner(p) and i != len(self.presses) - 1:
                raise ValueError("a ThinKPress must come last in a ComposedPress (it wraps "
                                 "the token presses before it)")

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
        last = self.presses[-1]
        if _is_channel_pruner(last) and len(self.presses) > 1:
            # ThinK needs the uncompressed layer for its full-width recent window
            rest = self.presses[:-1]
            inner = rest[0] if len(rest) == 1 else ComposedPress(presses=rest)
            return dataclasses.replace(last, press=inner).compress_layer(layer, obs, ctx)
        for p in self.presses:
            layer = p.compress_layer(layer, obs, ctx)
        return layer


def _is_channel_pruner(press) -> bool:
    from kvjax.presses.think import ThinKPress
    return isinstance(press, ThinKPress) and press.press is None


def _is_uncomp(press) -> bool:
    from kvjax.presses.uncomp import UNCompPress
    return isinstance(press, UNCompPress)
