"""kvjax: long-context LLM inference in JAX with a compressed KV cache."""

from kvjax.attention import cached_attention_reference
from kvjax.attention_scores import prefill_attention_reference
from kvjax.cache import (KVCache, KVStore, LayerView, Tail, kept_positions,
                         kv_nbytes_needed)
from kvjax.compress import compress
from kvjax.context import CompressedContext
from kvjax.compress import obs_spec_for as compress_obs_spec
from kvjax.hooks import DecodeHook
from kvjax.presses.ring import RingDecode
from kvjax.kvzip import RepeatPrompt
from kvjax.layer import begin_decode, decode_layer, decode_positions, prefill_layer
from kvjax.prompt import LayerPrompt, Prompt, PromptGroup, single_group
from kvjax.loops import GenerateOutput, generate, generate_stream
from kvjax.memory import MemoryReport, achieved_ratio, memory_report
from kvjax.observation import Observation, ObsSpec
from kvjax.pipeline import Pipeline, PipelineResult
from kvjax.presses import (AdaKVPress, ComposedPress, DecodingPress, ExpectedAttentionPress,
                           KeyDiffPress, KnormPress, KVzapPress, KVzipPress, NACLPress,
                           ObservedAttentionPress, Press, PyramidKVPress, RandomPress, ScorerPress, SnapKVPress, StreamingLLMPress, ThinKPress,
                           ThresholdPress, TOVAPress, UNCompPress, ZigZagKVPress, make_press)
from kvjax.presses.decode_budget import FixedSize, KeepSize, RatioOfSeen, ScoreThreshold
from kvjax.sampling import Greedy, Temperature, TopK, TopP

__all__ = [
    # presses
    "AdaKVPress", "ComposedPress", "DecodingPress", "ExpectedAttentionPress", "KeyDiffPress",
    "KnormPress", "KVzapPress", "KVzipPress", "RepeatPrompt",
    "NACLPress", "ObservedAttentionPress", "Press", "PyramidKVPress", "RandomPress",
    "ScorerPress", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "ThinKPress",
    "ThresholdPress", "UNCompPress",
    "ZigZagKVPress", "make_press",
    # decode budgets (DecodingPress(budget=...))
    "FixedSize", "KeepSize", "RatioOfSeen", "ScoreThreshold",
    # loops, pipeline, sampling
    "CompressedContext", "GenerateOutput", "Greedy", "Pipeline", "PipelineResult", "Temperature", "TopK", "TopP",
    "generate", "generate_stream",
    # cache, decode hooks, integration API, memory
    "DecodeHook", "KVCache", "KVStore", "LayerPrompt", "LayerView", "MemoryReport",
    "Observation", "ObsSpec", "Prompt", "PromptGroup", "RingDecode", "Tail",
    "achieved_ratio", "begin_decode", "cached_attention_reference", "compress", "compress_obs_spec", "decode_layer",
    "decode_positions", "kept_positions", "kv_nbytes_needed", "memory_report",
    "prefill_attention_reference", "prefill_layer", "single_group",
]

from kvjax.engine import Engine, EngineStats, Request, RequestResult  # noqa: E402

__all__ += ["Engine", "EngineStats", "Request", "RequestResult"]
