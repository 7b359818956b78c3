"""`models.load(source)`: a Hugging Face directory, a GGUF file, "smollm2", or a saved dir."""

from pathlib import Path

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.sharding import check_mesh
from models.hf import decoder_from_tensors, read_hf_config
from models.sources import SafetensorsSource

EMBEDDED_MODELS = ("smollm2",)


def default_dtype():
    """f32 on CPU (XLA CPU bf16 matmuls are ~10x slower), bf16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def check_dtype(dtype) -> jnp.dtype:
    """The parameter dtype as a jnp.dtype; ValueError unless it is a floating dtype."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{dtype=} is not a dtype (use e.g. jnp.bfloat16 or 'float32')") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype={dt.name}: parameters need a floating dtype (float32, "
                         "bfloat16, float16); int8 KV caches are kv_dtype='int8' in kvjax")
    return dt


def load(source: str | Path, *, dtype=None, mesh=None, progress: bool = True):
    """Load a model and its tokenizer.

    Args:
      source: "smollm2" (the embedded SmolLM2-135M-Instruct GGUF), a path to a GGUF file of a
        llama-architecture model, a Hugging Face checkpoint directory (config.json,
        tokenizer.json, *.safetensors), or a directory written by `models.save`.
      dtype: parameter/compute dtype; default f32 on CPU, bf16 on accelerators.
      mesh: a ("data", "model") `jax.sharding.Mesh` (`models.make_mesh`): parameters are
        created sharded (tensor parallel over "model", see `models.sharding`) and kvjax runs
        the model on the mesh. None: one device.
      progress: show progress bars.

    Loading streams one tensor at a time (safetensors read per tensor, one GGUF tensor
    dequantized at a time, orbax restoring into the target shardings): the host never holds
    a float32 copy of the whole model.

    Returns:
      (Decoder, Tokenizer).
    """
    dtype = check_dtype(default_dtype() if dtype is None else dtype)
    if mesh is not None:
        mesh = check_mesh(mesh)
    if str(source) in EMBEDDED_MODELS:
        from models.smollm2 import find_smollm2
        source = find_smollm2()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {str(source)!r} does not exist (expected "
                                f"{EMBEDDED_MODELS}, a .gguf file or a checkpoint directory)")
    if path.is_file():
        return _load_gguf(path, dtype, mesh, progress)
    from models.checkpoint import SAVED_MARKER, restore
    if (path / SAVED_MARKER).is_file():
        return restore(path, dtype=dtype, mesh=mesh)
    return _load_hf_dir(path, dtype, mesh, progress)


def _load_gguf(path: Path, dtype, mesh, progress: bool):
    if path.suffix != ".gguf":
        raise ValueError(f"{str(path)!r} is a file but not a .gguf file")
    from models.gguf import load_gguf
    ckpt = load_gguf(path, progress=progress, lazy=True)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    model = decoder_from_tensors(cfg, ckpt.tensors, dtype=dtype, mesh=mesh, progress=progress)
    return model, ckpt.tokenizer


def _load_hf_dir(path: Path, dtype, mesh, progress: bool):
    cfg = ModelConfig.from_hf_config(read_hf_config(path))
    tensors = SafetensorsSource(path)
    model = decoder_from_tensors(cfg, tensors, dtype=dtype, mesh=mesh, progress=progress)
    if not (path / "tokenizer.json").is_file():
        return model, None
    from models.tokenizer import Tokenizer
    return model, Tokenizer.from_hf_dir(path)


def save(model, tokenizer, path: str | Path) -> Path:
    """Save converted parameters (orbax), the config and the tokenizer for a fast reload."""
    from models.checkpoint import save as _save
    return _save(model, tokenizer, Path(path))
