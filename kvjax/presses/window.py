"""Window attention: the W x C block that SnapKV-family scorers read (docs/presses.md, SnapKV).

Computed from the post-RoPE queries of the last W prompt positions and the prefix keys with
plain matmuls after prefill; the T x T matrix is never formed.
"""

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale
from kvjax.cache import LayerView
from kvjax.observation import Observation

POOLINGS = ("avg", "max")


def check_window_args(obj) -> None:
    """ValueError unless obj.window_size >= 1, obj.kernel_size is a positive odd int and
    obj.pooling is one of POOLINGS (SnapKV, ZigZagKV, UNComp, the ring decode)."""
    if obj.window_size < 1:
        raise ValueError(f"{obj.window_size=} must be >= 1")
    if obj.kernel_size < 1 or obj.kernel_size % 2 == 0:
        raise ValueError(f"{obj.kernel_size=} must be a positive odd int")
    if obj.pooling not in POOLINGS:
        raise ValueError(f"{obj.pooling=} is not one of {POOLINGS}")


def window_positions(prompt_len: jax.Array, window: int) -> jax.Array:
    """[B] prompt lengths -> [B, W] positions of the observation window."""
    return prompt_len[:, None] - window + jnp.arange(window)[None, :]


def window_attention(prefix: LayerView, obs: Observation, prompt_len: jax.Array,
                     window: int) -> jax.Array:
    """Softmax attention of the last `window` prompt queries over the prefix slots.

    Args:
      prefix: k [B, K, C, H], pos [B, K, C], length [B, K] (full-width keys).
      obs: q_window [B, W_obs, N, H] with W_obs >= window (the last `window` rows are used).
      prompt_len: [B].

    Returns:
      probs [B, K, G, W, C] f32; causal (a window query sees slots at positions <= its own),
      zero on invalid slots and on rows before the prompt start.
    """
    if obs.q_window is None or obs.q_window.shape[1] < window:
        raise ValueError(f"observation window is too small for {window=}")
    q = obs.q_window[:, -window:]
    row_ok = obs.window_valid[:, -window:]  # [B, W]
    b, w, n, h = q.shape
    n_kv = prefix.k.shape[1]
    qg = q.reshape(b, w, n_kv, n // n_kv, h)
    logits = jnp.einsum("bwkgh,bkch->bkgwc", qg, prefix.k,
                        preferred_element_type=jnp.float32) * default_scale(h)
    q_pos = window_positions(prompt_len, window)  # [B, W]
    slot_ok = jnp.arange(prefix.capacity)[None, None, :] < prefix.length[..., None]
    mask = (prefix.pos[:, :, None, :] <= q_pos[:, None, :, None]) & slot_ok[:, :, None, :]
    mask = mask[:, :, None] & row_ok[:, None, None, :, None]  # [B, K, 1, W, C]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def in_window(prefix: LayerView, prompt_len: jax.Array, window: int) -> jax.Array:
    """[B, K, C] True for slots holding one of the last `window` prompt tokens."""
    return prefix.pos >= (prompt_len - window)[:, None, None]


def pool1d(x: jax.Array, kernel_size: int, mode: str = "avg") -> jax.Array:
    """Stride-1 'same' pooling along the last axis with zero padding kernel//2 each side.

    `avg` divides by the full kernel (torch's count_include_pad=True); `max` pads with -inf.
    """
    if kernel_size <= 1:
        return x
    pad = kernel_size // 2
    fill = 0.0 if mode == "avg" else -jnp.inf
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=fill)
    windows = jnp.stack([xp[..., i:i + x.shape[-1]] for i in range(kernel_size)], axis=0)
    return windows.mean(0) if mode == "avg" else windows.max(0)
