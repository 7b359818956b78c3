"""The one place that builds interpret-mode parameters for the kernels.

Every public kernel takes ``interpret: bool | None``:
  * ``None`` (default): compile for the kernel's backend when it is the default JAX backend,
    otherwise run in that backend's interpret mode on the host (so ``attn_impl="pallas_tpu"``
    on a CPU machine runs the TPU kernel in TPU interpret mode);
  * ``True``: always interpret; ``False``: always compile (fails off-backend).

TPU kernels use ``pltpu.InterpretParams()`` (the TPU interpreter: simulated VMEM/SMEM, DMAs,
scalar prefetch, out-of-bounds blocks filled with NaN). Mosaic GPU kernels use the Mosaic GPU
interpreter, ``InterpretGPUParams``, which jax 0.10.2 exposes only privately; if that import
fails, `GPU_INTERPRET_UNAVAILABLE` holds the reason and GPU interpret runs raise it.
"""

import jax
from jax.experimental.pallas import tpu as pltpu

try:  # private in jax 0.10.2; guarded so that only GPU interpret runs depend on it
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    GPU_INTERPRET_UNAVAILABLE: str | None = None
except ImportError as e:  # pragma: no cover - depends on the jax build
    InterpretGPUParams = None
    GPU_INTERPRET_UNAVAILABLE = f"Mosaic GPU interpreter not importable: {e}"


def _wants_interpret(interpret: bool | None, platform: str) -> bool:
    if interpret is None:
        return jax.default_backend() != platform
    return bool(interpret)


def tpu_interpret(interpret: bool | None):
    """`interpret=` value for a Mosaic TPU `pallas_call`: InterpretParams or False."""
    return pltpu.InterpretParams() if _wants_interpret(interpret, "tpu") else False


def gpu_interpret(interpret: bool | None):
    """`interpret=` value for a Mosaic GPU kernel: InterpretGPUParams or None (compiled).

    Raises:
      RuntimeError: interpret mode was asked for but the Mosaic GPU interpreter is missing.
    """
    if not _wants_interpret(interpret, "gpu"):
        return None
    if InterpretGPUParams is None:
        raise RuntimeError(GPU_INTERPRET_UNAVAILABLE)
    return InterpretGPUParams()
