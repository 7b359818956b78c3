"""Mosaic TPU kernels (run in TPU interpret mode on CPU)."""

from pallas_kernels.tpu.decode_attention import BlockSizes as DecodeBlockSizes
from pallas_kernels.tpu.decode_attention import decode_attention
from pallas_kernels.tpu.prefill_scores import BlockSizes as PrefillBlockSizes
from pallas_kernels.tpu.prefill_scores import prefill_attention_with_scores

__all__ = ["DecodeBlockSizes", "PrefillBlockSizes", "decode_attention",
           "prefill_attention_with_scores"]
