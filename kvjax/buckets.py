"""Prompt-length buckets: right padding to a few static lengths bounds recompilation."""

from collections.abc import Sequence

import jax
import numpy as np

MIN_BUCKET = 64
BUCKET_STEP = 256


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Padded length for n tokens: powers of two up to 256, then multiples of 256.

    Bounds the number of compilations (16 buckets up to 4k) while keeping the padding of
    long prompts, and so of their compressed prefixes, under 25%.
    """
    n = max(int(n), minimum)
    if n <= BUCKET_STEP:
        return 1 << (n - 1).bit_length()
    return -(-n // BUCKET_STEP) * BUCKET_STEP


def pad_prompts(input_ids, pad_id: int = 0, bucket: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of token lists to a length bucket.

    Args:
      input_ids: a sequence of token-id sequences (ragged), or a 2-D int array [B, T].

    Returns:
      tokens [B, T_bucket] int32 and lengths [B] int32.
    """
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in as_rows(input_ids)]
    if not rows:
        raise ValueError("input_ids is an empty batch")
    lengths = np.array([len(r) for r in rows], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt at batch index {int(np.argmin(lengths))}")
    width = bucket_length(lengths.max()) if bucket else int(lengths.max())
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, lengths


def as_rows(input_ids) -> list:
    if isinstance(input_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(input_ids)
        if arr.ndim == 1:
            return [arr]
        if arr.ndim != 2:
            raise ValueError(f"input_ids.ndim={arr.ndim} must be 1 or 2")
        return list(arr)
    if isinstance(input_ids, Sequence) and input_ids and isinstance(input_ids[0], (int, np.integer)):
        return [input_ids]
    return list(input_ids)
