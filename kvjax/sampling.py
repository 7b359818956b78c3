"""Sampling methods as frozen dataclasses (static jit arguments).

Each maps last-position logits [B, V] and a PRNG key to next tokens [B] int32.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Pick the argmax token."""

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"{self.temperature=} must be > 0 (use Greedy() for argmax)")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens, at `temperature`."""

    k: int = 50
    temperature: float = 1.0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"{self.k=} must be >= 1")
        Temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        k = min(self.k, logits.shape[-1])
        vals, idx = jax.lax.top_k(logits, k)
        choice = jax.random.categorical(key, vals / self.temperature, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""

    p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"{self.p=} must be in (0, 1]")
        Temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep while mass before < p
        kept = jnp.where(mass_before < self.p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, kept, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def check_sampler(sampler) -> None:
    """ValueError unless `sampler` is a sampler instance: a callable (logits, key) -> ids,
    not a class or a name (kvjax.Greedy(), Temperature(t), TopK(k), TopP(p))."""
    if isinstance(sampler, type) or isinstance(sampler, str) or not callable(sampler):
        raise ValueError(f"{sampler=} must be a sampler instance, e.g. kvjax.Greedy() or "
                         "kvjax.TopK(k=50)")

