"""Host-side allocation of the pool's slots: contiguous blocks, first fit, coalesced on free,
compacted when only fragmentation stands in the way.

The pool is one store row of `n_slots` slots shared by every running request (see
kvjax/engine/pool.py). A request's compressed store is written into one block of exactly
the slots its segments span (rounded up to `align`), and a block is returned to the free
list the moment its last user finishes. Blocks are reference counted so that a compressed
context answered by many requests is held once. When no free run is long enough but the
free slots in all are, `compact` slides the live blocks to the front (the engine moves their
slots on the device with one gather, `kvjax.engine.pool.move_blocks`), leaving one free run.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Block:
    """A run of pool slots [start, start + size) and the number of requests reading it."""

    start: int
    size: int
    refs: int = 1


class BlockAllocator:
    """First-fit allocator over [0, n_slots) in units of `align` slots.

    Mutable host state owned by one `kvjax.Engine`; nothing here touches a device.
    """

    def __init__(self, n_slots: int, align: int = 8):
        if n_slots < 0 or align < 1:
            raise ValueError(f"{n_slots=} must be >= 0 and {align=} >= 1")
        self.n_slots, self.align = n_slots - n_slots % align, align
        self._free: list[tuple[int, int]] = [(0, self.n_slots)] if self.n_slots else []
        self._used = 0
        self._live: dict[int, Block] = {}  # id -> live block

    def rounded(self, size: int) -> int:
        """`size` slots rounded up to the allocation unit (at least one unit)."""
        return max(self.align, -(-int(size) // self.align) * self.align)

    @property
    def used(self) -> int:
        """Slots held by live blocks."""
        return self._used

    @property
    def free(self) -> int:
        return self.n_slots - self._used

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def fits(self, size: int) -> bool:
        return self.rounded(size) <= self.largest_free

    def fits_compacted(self, size: int) -> bool:
        """`size` would fit after `compact` (the free slots in all suffice)."""
        return self.rounded(size) <= self.free

    def compact(self) -> list[tuple[Block, int]]:
        """Slide every live block down to close the gaps, in start order (so a block only
        moves toward slot 0), and leave one free run at the end.

        Returns (block, old start) for every block that moved; the blocks' `start` is
        updated in place."""
        moved, end = [], 0
        for block in sorted(self._live.values(), key=lambda b: b.start):
            if block.start != end:
                moved.append((block, block.start))
                block.start = end
            end += block.size
        self._free = [(end, self.n_slots - end)] if end < self.n_slots else []
        return moved

    def allocate(self, size: int) -> Block | None:
        """A block of `rounded(size)` slots, or None when no free run is long enough."""
        need = self.rounded(size)
        for i, (start, n) in enumerate(self._free):
            if n >= need:
                self._free[i:i + 1] = [(start + need, n - need)] if n > need else []
                self._used += need
                block = Block(start=start, size=need)
                self._live[id(block)] = block
                return block
        return None

    def release(self, block: Block) -> bool:
        """Drop one reference; the slots go back to the free list at the last one (-> True)."""
        if block.refs <= 0:
            raise ValueError(f"block at {block.start} of {block.size} slots is already free")
        block.refs -= 1
        if block.refs:
            return False
        self._used -= block.size
        del self._live[id(block)]
        runs = sorted(self._free + [(block.start, block.size)])
        merged: list[tuple[int, int]] = []
        for start, n in runs:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        self._free = merged
        return True
