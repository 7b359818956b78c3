"""Pallas kernels for kvjax's hot attention paths; imports only jax (docs/kernels.md).

Each kernel has a Mosaic TPU version (`pallas_kernels.tpu`) and a Mosaic GPU version
(`pallas_kernels.gpu`) with one signature, and a pure-jnp reference in kvjax that is its
specification:

  * `decode_attention`: one query token per sequence over a compressed prefix (ragged per-head
    lengths, optional thin keys) plus a dense tail, one softmax, GQA-aware
    (spec: `kvjax.attention.cached_attention_reference` with T = 1);
  * `prefill_attention_with_scores`: causal flash attention that also returns column sums of the
    attention probabilities over all rows, the last W rows, or proxy rows
    (spec: `kvjax.attention_scores.prefill_attention_with_scores_reference`).

`interpret=None` runs a kernel compiled on its own backend and in that backend's interpret
mode anywhere else (see `pallas_kernels._interpret`).
"""

from pallas_kernels import gpu, tpu
from pallas_kernels.gpu import decode_attention as gpu_decode_attention
from pallas_kernels.gpu import prefill_attention_with_scores as gpu_prefill_attention_with_scores
from pallas_kernels.tpu import decode_attention as tpu_decode_attention
from pallas_kernels.tpu import prefill_attention_with_scores as tpu_prefill_attention_with_scores

__all__ = ["gpu", "gpu_decode_attention", "gpu_prefill_attention_with_scores", "tpu",
           "tpu_decode_attention", "tpu_prefill_attention_with_scores"]
