"""Presses that are an allocator over any scorer (ZigZagKV, UNComp): the shared parts."""

from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress
from kvjax.presses.parts import Stage
from kvjax.presses.snapkv import SnapKVPress, check_window
from kvjax.presses.window import check_window_args


class ScoredAllocation:
    """Mixin for a press with fields `scorer` (a ScorerPress or None), `window_size`,
    `kernel_size`, `pooling`, `compression_ratio` and a method `allocator()`: tokens inside a
    layer or head are picked by `scorer`, SnapKV with the press's window by default."""

    def check_scorer(self) -> None:
        """Raise ValueError on a bad window, kernel or pooling, or a scorer that is not a
        ScorerPress."""
        check_window_args(self)
        if self.scorer is not None and not isinstance(self.scorer, ScorerPress):
            raise ValueError(f"scorer={self.scorer!r} is not a ScorerPress")

    def token_scorer(self) -> ScorerPress:
        """The scorer that picks tokens inside each layer and kv head."""
        if self.scorer is not None:
            return self.scorer
        return SnapKVPress(compression_ratio=self.compression_ratio,
                           window_size=self.window_size, kernel_size=self.kernel_size,
                           pooling=self.pooling)

    @property
    def obs_spec(self):
        return ObsSpec(window=self.window_size).merge(self.token_scorer().obs_spec)

    def check_prompt(self, min_prompt_len):
        check_window(self, min_prompt_len)
        self.token_scorer().check_prompt(min_prompt_len)

    def stages(self):
        if self.compression_ratio == 0:
            return ()
        scorer = self.token_scorer()
        return (Stage(scorer=scorer, allocator=self.allocator(), selector=scorer.selector()),)
