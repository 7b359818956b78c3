"""What a cache really holds: bytes of its arrays, and what a padding-free layout would need."""

import dataclasses

import numpy as np

from kvjax.cache import KVCache, kv_nbytes_needed, prefix_nbytes, scale_nbytes
from kvjax.quant import KV_DTYPES as QUANTIZED


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Cache memory figures (host values; build outside jit).

    Attributes:
      bytes_held: bytes of every array of the cache (keys, values, positions, table, tail).
      kv_bytes_held: bytes of the key and value arrays only (store + tail buffers), with a
        quantized store's scales.
      kv_bytes_needed: bytes of the valid key/value entries (no padding, no empty tail slots).
      prefix_kv_bytes_held / prefix_kv_bytes_needed: the same for the store alone (what the
        press decided; the tail excluded).
      store_slots: slots per sequence in the store (all rows); max_segment: the view width.
      prefix_tokens: kept entries per layer, summed over batch and kv heads.
      key_width: stored key channels (smaller than the head dim with ThinK).
      kv_dtype: the store's key/value dtype ("int8" when quantized, else e.g. "float32").
    """

    bytes_held: int
    kv_bytes_held: int
    kv_bytes_needed: int
    prefix_kv_bytes_held: int
    prefix_kv_bytes_needed: int
    store_slots: int
    max_segment: int
    prefix_tokens: tuple[int, ...]
    key_width: int
    kv_dtype: str = ""

    @property
    def padding_fraction(self) -> float:
        """Share of held key/value bytes that are padding or empty tail slots."""
        return 1.0 - self.kv_bytes_needed / max(self.kv_bytes_held, 1)

    @property
    def prefix_overhead(self) -> float:
        """Store bytes held / needed (1.0 = exactly the kept entries)."""
        return self.prefix_kv_bytes_held / max(self.prefix_kv_bytes_needed, 1)

    def __str__(self) -> str:
        return (f"KV cache: {fmt_bytes(self.bytes_held)} held "
                f"({fmt_bytes(self.kv_bytes_held)} keys+values, "
                f"{fmt_bytes(self.kv_bytes_needed)} valid entries, "
                f"{100 * self.padding_fraction:.1f}% padding/empty tail); "
                f"store: {self.prefix_overhead:.3f}x its kept entries"
                + (f", {self.kv_dtype} with f32 scales" if self.kv_dtype in QUANTIZED else ""))


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_report(cache: KVCache) -> MemoryReport:
    """Summarise what `cache` holds (call outside jit: reads lengths to the host)."""
    store, tail = cache.store, cache.tail
    length = np.asarray(store.length)  # [B, L, K]
    prefix_held = store.k.nbytes + store.v.nbytes + scale_nbytes(store)  # scales: quantized
    return MemoryReport(
        bytes_held=cache.nbytes, kv_bytes_held=prefix_held + tail.k.nbytes + tail.v.nbytes,
        kv_bytes_needed=kv_nbytes_needed(cache), prefix_kv_bytes_held=prefix_held,
        prefix_kv_bytes_needed=prefix_nbytes(store, int(length.sum())),
        store_slots=store.rows * store.slots, max_segment=store.max_segment,
        prefix_tokens=tuple(int(x) for x in length.sum(axis=(0, 2))),
        key_width=int(store.k.shape[-1]), kv_dtype=str(store.k.dtype))


def achieved_ratio(cache: KVCache, prompt_lengths) -> np.ndarray:
    """[B] the compression ratio each sequence reached: 1 - (prompt entries its store keeps,
    over every layer and kv head) / (L * K * prompt length). For a press whose budget follows
    the input (`kvjax.ThresholdPress`), the ratio it achieved; for a fixed ratio, about it.
    Call outside jit (reads the table to the host)."""
    length = np.asarray(cache.store.length)  # [B, L, K]
    n = np.asarray(prompt_lengths, np.float64).reshape(-1)
    if n.shape[0] != length.shape[0] or (n < 1).any():
        raise ValueError(f"prompt_lengths={list(n)} must give one length >= 1 per sequence "
                         f"(batch {length.shape[0]})")
    return 1.0 - length.sum(axis=(1, 2)) / (length.shape[1] * length.shape[2] * n)
