"""Model configuration: one frozen dataclass for every Llama/Mistral variant.

Llama 2, 3, 3.1, 3.2 and Mistral share one decoder; they differ only by these fields
(`sliding_window` for Mistral, `rope_scaling` for Llama 3.1/3.2, `tie_embeddings` for the
small Llama 3.2 and SmolLM2 models).
"""

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
    """Llama 3.x frequency-dependent RoPE scaling (HF `rope_type="llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1.0:
            raise ValueError(f"{self.factor=} must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"{self.low_freq_factor=} must be in (0, {self.high_freq_factor=})")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Hyperparameters of a Llama-architecture decoder (axis letters in comments)."""

    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 4096
    sliding_window: int | None = None
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    model_type: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} must be a multiple of {self.n_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"{self.head_dim=} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"{self.sliding_window=} must be positive or None")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{self.model_type=} is not one of {SUPPORTED_MODEL_TYPES}")

    @property
    def group_size(self) -> int:
        """G = N // K, query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    # ----- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A 2-layer GQA 4:1 model for tests."""
        base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                    head_dim=16, mlp_dim=128, max_seq_len=512)
        return cls(**{**base, **overrides})

    @classmethod
    def llama2_7b(cls) -> "ModelConfig":
        return cls(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                   head_dim=128, mlp_dim=11008, rms_eps=1e-5, max_seq_len=4096, bos_id=1,
                   eos_ids=(2,))

    @classmethod
    def llama3_8b(cls) -> "ModelConfig":
        return cls(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   head_dim=128, mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192,
                   bos_id=128000, eos_ids=(128001, 128009))

    @classmethod
    def llama31_8b(cls) -> "ModelConfig":
        return dataclasses.replace(cls.llama3_8b(), max_seq_len=131072, rope_scaling=RopeScaling())

    @classmethod
    def llama32_1b(cls) -> "ModelConfig":
        return cls(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                   head_dim=64, mlp_dim=8192, rope_theta=500000.0, max_seq_len=131072,
                   tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0), bos_id=128000,
                   eos_ids=(128001, 128008, 128009))

    @classmethod
    def mistral_7b(cls) -> "ModelConfig":
        return cls(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   head_dim=128, mlp_dim=14336, max_seq_len=32768, sliding_window=4096,
                   bos_id=1, eos_ids=(2,), model_type="mistral")

    @classmethod
    def smollm2_135m(cls) -> "ModelConfig":
        return cls(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                   head_dim=64, mlp_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                   tie_embeddings=True, bos_id=1, eos_ids=(2,))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (LlamaConfig / MistralConfig)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{model_type=} is not supported; expected one of "
                             f"{SUPPORTED_MODEL_TYPES}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{flag}={hf[flag]!r}: biased projections are not supported")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            mlp_dim=hf["intermediate_size"], rope_theta=float(_rope_theta(hf)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(hf), bos_id=hf.get("bos_token_id"),
            eos_ids=_as_tuple(hf.get("eos_token_id")), model_type=model_type,
        )


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def _rope_params(hf: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings to `rope_parameters`; 4.x uses `rope_scaling`.
    return hf.get("rope_parameters") or hf.get("rope_scaling")


def _rope_theta(hf: dict[str, Any]) -> float:
    params = _rope_params(hf) or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    params = _rope_params(hf)
    if not params:
        return None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"{rope_type=} is not supported (only 'default' and 'llama3')")
    return RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
