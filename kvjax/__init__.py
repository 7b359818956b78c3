"""kvjax: long-context LLM inference in JAX with a compressed KV cache."""

from kvjax.attention import cached_attention_reference, prefill_attention_reference
from kvjax.cache import KVCache, LayerCache, Prefix, Tail, kv_nbytes_needed
from kvjax.loops import GenerateOutput, generate, generate_stream
from kvjax.layer import decode_layer, decode_positions, prefill_layer
from kvjax.memory import MemoryReport, memory_report
from kvjax.observation import Observation, ObsSpec
from kvjax.presses import (AdaKVPress, ComposedPress, ExpectedAttentionPress, KnormPress,
                           ObservedAttentionPress, Press, PyramidKVPress, RandomPress,
                           ScorerPress, SnapKVPress, StreamingLLMPress, TOVAPress, make_press)
from kvjax.pipeline import Pipeline
from kvjax.sampling import Greedy, Temperature, TopK, TopP

__all__ = [
    "AdaKVPress", "ComposedPress", "ExpectedAttentionPress", "KnormPress",
    "ObservedAttentionPress", "Press", "PyramidKVPress", "RandomPress", "ScorerPress",
    "SnapKVPress", "StreamingLLMPress", "TOVAPress", "make_press",
    "GenerateOutput", "MemoryReport", "memory_report", "Pipeline", "Greedy", "KVCache", "LayerCache", "Observation", "ObsSpec", "Prefix",
    "Tail", "Temperature", "TopK", "TopP", "cached_attention_reference", "decode_layer",
    "decode_positions", "generate", "generate_stream", "kv_nbytes_needed", "prefill_layer",
    "prefill_attention_reference",
]
