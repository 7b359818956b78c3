"""Compression presses: frozen dataclasses passed to jit as static arguments."""

from kvjax.presses.adakv import AdaKVPress
from kvjax.presses.base import LayerContext, Press, ScorerPress, WrapperPress
from kvjax.presses.composed import ComposedPress
from kvjax.presses.decoding import DecodingPress
from kvjax.presses.expected_attention import ExpectedAttentionPress
from kvjax.presses.keydiff import KeyDiffPress
from kvjax.presses.kvzap import KVzapPress
from kvjax.presses.kvzip import KVzipPress
from kvjax.presses.knorm import KnormPress
from kvjax.presses.nacl import NACLPress
from kvjax.presses.observed_attention import ObservedAttentionPress
from kvjax.presses.pyramidkv import PyramidKVPress
from kvjax.presses.random import RandomPress
from kvjax.presses.registry import PRESSES, make_press, press_names
from kvjax.presses.snapkv import SnapKVPress
from kvjax.presses.streaming_llm import StreamingLLMPress
from kvjax.presses.think import ThinKPress
from kvjax.presses.threshold import ThresholdPress
from kvjax.presses.tova import TOVAPress
from kvjax.presses.uncomp import UNCompPress
from kvjax.presses.zigzag import ZigZagKVPress

__all__ = [
    "AdaKVPress", "ComposedPress", "DecodingPress", "ExpectedAttentionPress", "KeyDiffPress",
    "KnormPress", "KVzapPress", "KVzipPress",
    "LayerContext", "NACLPress", "ObservedAttentionPress", "PRESSES", "Press", "PyramidKVPress",
    "RandomPress", "ScorerPress", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "ThinKPress",
    "ThresholdPress", "UNCompPress", "WrapperPress", "ZigZagKVPress", "make_press",
    "press_names",
]
