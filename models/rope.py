"""Rotary position embeddings: default and Llama 3 (`rope_type="llama3"`) frequency scaling."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
    """Return the [H/2] rotary inverse frequencies (numpy, so they are trace-time constants)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv.astype(np.float32)
    return _llama3_scale(inv, scaling).astype(np.float32)


def _llama3_scale(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    old = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class Rope:
    """Static rotary embedding (hashable; arrays are built at trace time)."""

    head_dim: int
    theta: float
    scaling: RopeScaling | None = None

    def inverse_frequencies(self) -> np.ndarray:
        """[H/2] rotary inverse frequencies (with any scaling applied)."""
        return inverse_frequencies(self.head_dim, self.theta, self.scaling)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotate x [B, T, heads, H] by positions [B, T] (HF rotate-half convention)."""
        inv = jnp.asarray(self.inverse_frequencies())
        angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        x1, x2 = jnp.split(x, 2, axis=-1)
        return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
