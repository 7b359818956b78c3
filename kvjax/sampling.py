"""Sampling methods as frozen dataclasses (static jit arguments).

Each maps last-position logits [B, V] and a PRNG key to next tokens [B] int32. The built-in
ones also expose `sample(logits, key, *values)`, a static function of their float fields
(`TRACED`), so the serving engine can pass temperature and top-p as data: requests with other
values share one compilation (`sampler_family`).
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Pick the argmax token."""

    TRACED = ()

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return self.sample(logits, key)

    @staticmethod
    def sample(logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0
    TRACED = ("temperature",)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"{self.temperature=} must be > 0 (use Greedy() for argmax)")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return self.sample(logits, key, self.temperature)

    @staticmethod
    def sample(logits: jax.Array, key: jax.Array, temperature) -> jax.Array:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens, at `temperature`."""

    k: int = 50
    temperature: float = 1.0
    TRACED = ("temperature",)  # k is a shape: each k is its own family

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"{self.k=} must be >= 1")
        Temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return self.sample(logits, key, self.temperature)

    def sample(self, logits: jax.Array, key: jax.Array, temperature) -> jax.Array:
        k = min(self.k, logits.shape[-1])
        vals, idx = jax.lax.top_k(logits, k)
        choice = jax.random.categorical(key, vals / temperature, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""

    p: float = 0.9
    temperature: float = 1.0
    TRACED = ("p", "temperature")

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"{self.p=} must be in (0, 1]")
        Temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return self.sample(logits, key, self.p, self.temperature)

    @staticmethod
    def sample(logits: jax.Array, key: jax.Array, p, temperature) -> jax.Array:
        logits = logits / temperature
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep while mass before < p
        kept = jnp.where(mass_before < p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, kept, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def check_sampler(sampler) -> None:
    """ValueError unless `sampler` is a sampler instance: a callable (logits, key) -> ids,
    not a class or a name (kvjax.Greedy(), Temperature(t), TopK(k), TopP(p))."""
    if isinstance(sampler, type) or isinstance(sampler, str) or not callable(sampler):
        raise ValueError(f"{sampler=} must be a sampler instance, e.g. kvjax.Greedy() or "
                         "kvjax.TopK(k=50)")


MAX_TRACED = 2  # float fields a built-in sampler passes as data


def sampler_family(sampler) -> tuple[object, tuple[float, ...]]:
    """(family, values): samplers of one family share a compiled step and differ only in
    `values` (their `TRACED` float fields), e.g. every `TopP` -> (TopP family, (p, t)).

    A sampler without `TRACED` (a user's callable) is its own family with no values."""
    traced = getattr(type(sampler), "TRACED", None)
    if traced is None:
        return sampler, ()
    base = dataclasses.replace(sampler, **{f: _UNIT[f] for f in traced})
    return base, tuple(float(getattr(sampler, f)) for f in traced)


_UNIT = {"temperature": 1.0, "p": 1.0}


def sample_family(family, logits: jax.Array, key: jax.Array, values: jax.Array) -> jax.Array:
    """`family`'s draw with its traced values [MAX_TRACED] (f32) -> tokens [B]."""
    traced = getattr(type(family), "TRACED", None)
    if traced is None:
        return family(logits, key)
    return family.sample(logits, key, *(values[i] for i in range(len(traced))))
