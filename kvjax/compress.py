"""Apply a press to every layer of a freshly prefilled cache (pure; runs inside jit)."""

from kvjax.cache import KVCache
from kvjax.observation import ObsSpec


def obs_spec_for(press) -> ObsSpec:
    """What the press needs observed during prefill (nothing for the full cache)."""
    return ObsSpec() if press is None else press.obs_spec


def compress_cache(press, cache: KVCache, observations) -> KVCache:
    """Return the cache with every layer's prefix compressed by `press` (None: unchanged)."""
    if press is None:
        return cache
    return press.compress(cache, observations)
