"""Lazy tensor sources: read one checkpoint tensor at a time, never the whole model.

A source maps Hugging Face tensor names to arrays in Hugging Face layout, but reads a tensor
only when asked (`read(name)`) and knows every shape without reading (`shape(name)`). The
loader (`models.hf.decoder_from_tensors`) builds each parameter from it, slice by slice, so
the host never holds a full-model float32 copy.

* `SafetensorsSource`: indexes the `*.safetensors` shards of an HF directory by their
  headers; `read` reads one tensor in the file's dtype (bf16 through `ml_dtypes`).
* `GGUFSource`: dequantizes one GGUF tensor to float32 on demand (`models.gguf`).
* a plain dict name -> array is a source too (`as_source`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class DictSource:
    """A source over an in-memory mapping name -> array (tests, GGUF's eager path)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[name]))

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._tensors[name])[rows]


def as_source(tensors):
    """A source as is, or a mapping wrapped in `DictSource`."""
    return tensors if hasattr(tensors, "read") else DictSource(tensors)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of one .safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"cannot read safetensors shard {str(path)!r}: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"cannot read safetensors shard {str(path)!r}: header of {n} bytes "
                             f"but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"cannot read safetensors shard {str(path)!r}: bad header: {e}") \
                from e
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise ValueError(f"cannot read safetensors shard {str(path)!r}: truncated, tensor "
                             f"{name!r} ends at byte {end} but the file has {size}")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {str(path)!r} has dtype {info['dtype']}, "
                             f"not one of {sorted(SAFETENSORS_DTYPES)}")
    return header, 8 + n


class SafetensorsSource:
    """Every tensor of an HF checkpoint directory's `*.safetensors` shards, read on demand.

    When the directory has `model.safetensors.index.json`, every shard it names must exist
    (a missing shard is an error naming the file).
    """

    def __init__(self, path: Path):
        path = Path(path)
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
        _check_index(path)
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for shard in shards:
            header, base = _safetensors_header(shard)
            for name, info in header.items():
                self._where[name] = (shard, info, base)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` (a step-1 slice of axis 0) of tensor `name` in its file dtype, read
        alone: only those bytes come off the disk (a read-only array).

        Read with `os.pread`, not a memory map: mapped pages would stay resident (and count
        in the process's memory) after the tensor is converted."""
        shard, info, base = self._where[name]
        shape = list(info["shape"])
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
        if step != 1:
            raise ValueError(f"{rows=} must be a contiguous slice")
        n = max(0, stop - first)
        fd = os.open(shard, os.O_RDONLY)
        try:
            raw = os.pread(fd, n * row_bytes, base + info["data_offsets"][0] + first * row_bytes)
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=dtype).reshape([n] + shape[1:] if shape else [])


def _check_index(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint shard {str(path / missing[0])!r} named in "
                                f"{index.name} is missing ({len(missing)} of {len(files)} missing)")
