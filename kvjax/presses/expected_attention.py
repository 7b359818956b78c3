"""ExpectedAttention: attention that future queries are expected to pay, in closed form
(kvpress, arXiv 2510.00636)."""

import dataclasses
import math

import jax.numpy as jnp

from kvjax.observation import ObsSpec
from kvjax.presses.base import ScorerPress


def averaged_rotation(inv_freq, start, n_future: int, interleaved: bool = False):
    """Mean RoPE rotation matrix over positions start .. start + n_future - 1.

    Args:
      inv_freq: [H/2] rotary inverse frequencies; start: [B] first future position.
      interleaved: GPT-J pairs (2i, 2i+1) instead of rotate-half pairs (i, i + H/2).

    Returns:
      R [B, H, H] = mean_p cos_p I + sin_p P, with P the 90-degree rotation of every pair
      (rotate-half: P = [[0, -I], [I, 0]]).
    """
    pos = start[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)
    ang = pos[..., None] * inv_freq  # [B, F, H/2]
    cos, sin = jnp.cos(ang).mean(1), jnp.sin(ang).mean(1)  # [B, H/2]
    half = inv_freq.shape[0]
    if interleaved:
        c, s = jnp.repeat(cos, 2, -1), jnp.repeat(sin, 2, -1)
        pair = jnp.array([[0.0, -1.0], [1.0, 0.0]])
        p = jnp.kron(jnp.eye(half), pair)
    else:
        c, s = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
        eye = jnp.eye(half)
        p = jnp.block([[jnp.zeros((half, half)), -eye], [eye, jnp.zeros((half, half))]])
    return c[:, :, None] * jnp.eye(2 * half) + s[:, :, None] * p


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttentionPress(ScorerPress):
    """Expected Attention (Devoto et al., kvpress; arXiv 2510.00636), kvpress defaults.

    Future queries are modelled as Gaussian: the mean and covariance of the prompt's pre-RoPE
    queries (sinks excluded), rotated by the RoPE rotation averaged over the next
    `n_future_positions` positions. A key's score is the softmax over prompt tokens of the
    expected logit `mu·k/sqrt(H) + k^T Σ k / (2H)`, averaged over the query group and scaled
    by `||v||`; the first `n_sink` tokens are always kept.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_future_positions < 1:
            raise ValueError(f"{self.n_future_positions=} must be >= 1")
        if self.n_sink < 0:
            raise ValueError(f"{self.n_sink=} must be >= 0")
        if self.epsilon < 0:
            raise ValueError(f"{self.epsilon=} must be >= 0")

    @property
    def obs_spec(self):
        return ObsSpec(query_stats=True, query_stats_skip=self.n_sink)

    def check_prompt(self, min_prompt_len):
        if min_prompt_len <= self.n_sink:
            raise ValueError(f"prompt length {min_prompt_len} must exceed n_sink={self.n_sink}")

    def score(self, prefix, obs, ctx):
        rot = averaged_rotation(obs.rope_inv_freq, ctx.prompt_len, self.n_future_positions,
                                obs.rope_interleaved)
        mu = jnp.einsum("bnh,bih->bni", obs.q_mean, rot)
        b, n, h = mu.shape
        n_kv = prefix.k.shape[1]
        k = prefix.k.astype(jnp.float32)
        logits = jnp.einsum("bkgh,bkch->bkgc", mu.reshape(b, n_kv, -1, h), k) / math.sqrt(h)
        if self.use_covariance:
            cov = jnp.einsum("bij,bnjl,bml->bnim", rot, obs.q_cov, rot)
            cov = cov.reshape(b, n_kv, -1, h, h)
            logits += jnp.einsum("bkci,bkgij,bkcj->bkgc", k, cov, k) / h / 2
        sink = prefix.pos < self.n_sink
        valid = (jnp.arange(prefix.capacity) < prefix.length[..., None]) & ~sink
        logits = jnp.where(valid[:, :, None], logits, -jnp.inf)
        s = _softmax_mean(logits)
        if self.use_vnorm:
            s = (s + self.epsilon) * jnp.linalg.norm(prefix.v.astype(jnp.float32), axis=-1)
        return jnp.where(sink, jnp.inf, s)


def _softmax_mean(logits):
    """Softmax over slots per query head, then mean over the group: [B,K,G,C] -> [B,K,C]."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    return (e / jnp.sum(e, axis=-1, keepdims=True)).mean(2)
