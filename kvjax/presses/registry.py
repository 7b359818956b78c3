"""Every press by name, with example arguments: drives the CLI and the generic tests."""

from kvjax.kvzap.weights import ShippedWeights, UntrainedWeights
from kvjax.presses.adakv import AdaKVPress
from kvjax.presses.composed import ComposedPress
from kvjax.presses.expected_attention import ExpectedAttentionPress
from kvjax.presses.keydiff import KeyDiffPress
from kvjax.presses.kvzap import KVzapPress
from kvjax.kvzip import RepeatPrompt
from kvjax.presses.kvzip import KVzipPress
from kvjax.presses.knorm import KnormPress
from kvjax.presses.nacl import NACLPress
from kvjax.presses.observed_attention import ObservedAttentionPress
from kvjax.presses.pyramidkv import PyramidKVPress
from kvjax.presses.ring import RingDecode
from kvjax.presses.random import RandomPress
from kvjax.presses.snapkv import SnapKVPress
from kvjax.presses.streaming_llm import StreamingLLMPress
from kvjax.presses.think import ThinKPress
from kvjax.presses.tova import TOVAPress
from kvjax.presses.uncomp import UNCompPress
from kvjax.presses.zigzag import ZigZagKVPress


def _adakv(compression_ratio=0.0, **kwargs):
    alpha = kwargs.pop("alpha_safeguard", 0.2)
    return AdaKVPress(press=SnapKVPress(compression_ratio=compression_ratio, **kwargs),
                      alpha_safeguard=alpha)


def _think(compression_ratio=0.0, key_channel_compression_ratio=0.4,
           value_channel_compression_ratio=0.0, window_size=32, kernel_size=7, pooling="max"):
    """SnapKV (token ratio) + ThinK channels, the paper's setting (window 32, max-pool 7);
    compression_ratio=0 gives ThinK alone."""
    press = None if compression_ratio == 0 else SnapKVPress(
        compression_ratio=compression_ratio, window_size=window_size, kernel_size=kernel_size,
        pooling=pooling)
    return ThinKPress(key_channel_compression_ratio=key_channel_compression_ratio,
                      value_channel_compression_ratio=value_channel_compression_ratio,
                      window_size=window_size, press=press)


def _kvzap(compression_ratio=0.0, weights="smollm2"):
    """KVzap with the shipped SmolLM2 weights unless `weights=` names others (a directory
    written by `kvjax train-scorer`, a .npz file, KVzapWeights)."""
    return KVzapPress(compression_ratio=compression_ratio, weights=weights)


def _kvzap_plus(compression_ratio=0.0, weights=ShippedWeights(kvzip_plus=True), **kwargs):
    """KVzap with the shipped weights trained on KVzip+ scores (the KVzap paper's target)
    that fit the model, unless `weights=` names others."""
    return KVzapPress(compression_ratio=compression_ratio, weights=weights, **kwargs)


def _kvzip_plus(compression_ratio=0.0, **kwargs):
    """KVzip+ (the KVzap paper's score): KVzipPress(kvzip_plus_normalization=True)."""
    return KVzipPress(compression_ratio=compression_ratio, kvzip_plus_normalization=True,
                      **kwargs)


def _snap_knorm(compression_ratio=0.0, **kwargs):
    half = 1 - (1 - compression_ratio) ** 0.5
    return ComposedPress(presses=(SnapKVPress(compression_ratio=half, **kwargs),
                                  KnormPress(compression_ratio=half)))


# name -> (factory(compression_ratio=..., **kwargs), example kwargs for tests, one-line summary)
PRESSES = {
    "streaming_llm": (StreamingLLMPress, dict(n_sink=4), "attention sinks + recent tokens"),
    "snapkv": (SnapKVPress, dict(window_size=8, kernel_size=5),
               "attention from the last W prompt queries, pooled"),
    "pyramidkv": (PyramidKVPress, dict(window_size=8), "SnapKV with layer budgets shrinking "
                  "linearly with depth"),
    "adakv": (_adakv, dict(window_size=8), "AdaKV head-wise budgets over SnapKV scores"),
    "observed_attention": (ObservedAttentionPress, {}, "H2O-style mean attention received"),
    "tova": (TOVAPress, {}, "attention of the last prompt token, averaged over heads"),
    "knorm": (KnormPress, {}, "smallest key norms"),
    "keydiff": (KeyDiffPress, {}, "keys least similar to the mean key (arXiv 2504.15364)"),
    "kvzip": (KVzipPress, dict(chunk_size=48, repeat=RepeatPrompt(first=(7, 8, 9), part=(7, 8),
                                                                   suffix=(10,))),
              "context reconstruction: attention from a repeat of the context "
              "(arXiv 2505.23416; the tokenizer gives the repeat prompt)"),
    "kvzip_plus": (_kvzip_plus, dict(chunk_size=48, repeat=RepeatPrompt(
        first=(7, 8, 9), part=(7, 8), suffix=(10,))),
        "KVzip+: repeat attention / ||h|| x ||W_O v|| (arXiv 2601.07891)"),
    # The example weights fit any model (the registry tests run tiny random models): an
    # untrained random projection (kvjax.kvzap.UntrainedWeights), which tests the press's
    # mechanics, not its quality; by name the press defaults to the shipped SmolLM2 weights.
    "kvzap": (_kvzap, dict(weights=UntrainedWeights(seed=0)), "learned linear/MLP scorer of "
              "hidden states approximating KVzip (arXiv 2601.07891; weights=smollm2|DIR)"),
    "kvzap_plus": (_kvzap_plus, dict(weights=UntrainedWeights(seed=0)), "KVzap trained on "
                   "KVzip+ scores (the paper's target; shipped for SmolLM2)"),
    "expected_attention": (ExpectedAttentionPress, dict(n_future_positions=64),
                           "closed-form expected attention of future queries"),
    "random": (RandomPress, dict(seed=0), "uniformly random tokens (baseline)"),
    "nacl": (NACLPress, dict(proxy_tokens_ratio=0.1, n_sink=2, recent_ratio=0.05, seed=0),
             "NACL proxy-token top-k + softmax-random eviction (kvpress-style budget)"),
    "think": (_think, dict(window_size=8, key_channel_compression_ratio=0.5),
              "SnapKV tokens + ThinK key-channel pruning (arXiv 2407.21018)"),
    "zigzagkv": (ZigZagKVPress, dict(window_size=8),
                 "per-input layer budgets from layer uncertainty (arXiv 2412.09036)"),
    "uncomp": (UNCompPress, dict(window_size=8), "UNComp matrix-entropy kv-head groups, "
               "SnapKV inside heads (arXiv 2410.03090; calibration=FILE|smollm2)"),
    "snapkv_knorm": (_snap_knorm, dict(window_size=8), "ComposedPress: SnapKV then KNorm"),
}


# Decode hooks a saved compressed context may carry, by class name (kvjax/context.py): a hook
# of plain int/str fields, rebuilt from them
DECODE_HOOKS = {"RingDecode": RingDecode}


def press_names() -> list[str]:
    return sorted(PRESSES)


def make_press(name: str, compression_ratio: float = 0.0, **kwargs):
    """Build a press by registry name, e.g. make_press("snapkv", 0.75, window_size=32)."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name=}; known: {', '.join(press_names())}")
    factory = PRESSES[name][0]
    try:
        return factory(compression_ratio=compression_ratio, **kwargs)
    except TypeError as e:  # unknown hyperparameter name
        raise ValueError(f"bad arguments {kwargs} for press {name!r}: {e}") from e
