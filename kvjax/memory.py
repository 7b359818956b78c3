"""What a cache really holds: bytes of its arrays, and what a padding-free layout would need."""

import dataclasses

import numpy as np

from kvjax.cache import KVCache, kv_nbytes_needed, layer_parts


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Cache memory figures (host values; build outside jit).

    Attributes:
      bytes_held: bytes of every array of the cache (keys, values, positions, lengths, tail).
      kv_bytes_held: bytes of the key and value arrays only (prefix + tail buffers).
      kv_bytes_needed: bytes of the valid key/value entries (no padding, no empty tail slots).
      prefix_capacity: static prefix slots per layer.
      prefix_tokens: valid prefix slots per layer, summed over batch and kv heads.
      key_width: stored key channels per layer (smaller than the head dim with ThinK).
    """

    bytes_held: int
    kv_bytes_held: int
    kv_bytes_needed: int
    prefix_capacity: tuple[int, ...]
    prefix_tokens: tuple[int, ...]
    key_width: tuple[int, ...]

    @property
    def padding_fraction(self) -> float:
        """Share of held key/value bytes that are padding or empty tail slots."""
        return 1.0 - self.kv_bytes_needed / max(self.kv_bytes_held, 1)

    def __str__(self) -> str:
        caps = sorted(set(self.prefix_capacity))
        cap = f"{caps[0]}" if len(caps) == 1 else f"{caps[0]}..{caps[-1]}"
        return (f"KV cache: {fmt_bytes(self.bytes_held)} held "
                f"({fmt_bytes(self.kv_bytes_held)} keys+values, "
                f"{fmt_bytes(self.kv_bytes_needed)} valid entries, "
                f"{100 * self.padding_fraction:.1f}% padding/empty tail); "
                f"prefix slots per layer: {cap}")


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_report(cache: KVCache) -> MemoryReport:
    """Summarise what `cache` holds (call outside jit: reads lengths to the host)."""
    per_layer = [layer_parts(cache.layer(i)) for i in range(len(cache.layers))]
    dense = [part for layer in cache.layers for part in layer_parts(layer)]
    kv_held = sum(p.prefix.k.nbytes + p.prefix.v.nbytes + p.tail.k.nbytes + p.tail.v.nbytes
                  for p in dense)
    if cache.pool is not None:
        kv_held += cache.pool.k.nbytes + cache.pool.v.nbytes
    return MemoryReport(
        bytes_held=cache.nbytes, kv_bytes_held=kv_held, kv_bytes_needed=kv_nbytes_needed(cache),
        prefix_capacity=tuple(max(p.prefix.capacity for p in parts) for parts in per_layer),
        prefix_tokens=tuple(sum(int(np.asarray(p.prefix.length).sum()) for p in parts)
                            for parts in per_layer),
        key_width=tuple(parts[0].prefix.k.shape[-1] for parts in per_layer))
