"""Safetensors shards read and written a block of rows at a time.

``mx.load`` reads a whole tensor the first time any part of it is used, and
``mx.save_safetensors`` writes a shard from tensors held in memory. Converting
a 1 GB expert tensor (or a 51.6 GB checkpoint into 5 GB shards) that way holds
whole tensors and whole shards in memory. Here a shard's header is written
first, from the shapes alone, and each tensor is then filled in row blocks
(along its first axis: experts, or vocabulary rows), so memory holds one block.

The file format: an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range in the data that follows, then the
data (https://github.com/huggingface/safetensors).
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import mlx.core as mx
import numpy as np

# Safetensors dtype name -> (MLX dtype, numpy dtype of the same bytes). numpy has
# no bfloat16: its bytes travel as uint16 and are re-viewed in MLX.
_DTYPES = {
    "BF16": (mx.bfloat16, np.uint16),
    "F16": (mx.float16, np.float16),
    "F32": (mx.float32, np.float32),
    "U32": (mx.uint32, np.uint32),
    "U8": (mx.uint8, np.uint8),
    "I32": (mx.int32, np.int32),
}
_NAMES = {mlx: name for name, (mlx, _) in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit on header size


class ShardError(ValueError):
    """A shard that cannot be read; the message names the file."""


def dtype_name(dtype: mx.Dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"no safetensors dtype for {dtype}")
    return _NAMES[dtype]


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes are in a shard file."""

    file: Path
    dtype: str
    shape: Tuple[int, ...]
    offset: int  # from the start of the file

    @property
    def mx_dtype(self) -> mx.Dtype:
        return _DTYPES[self.dtype][0]

    @property
    def rows(self) -> int:
        """Blocks are cut along the first axis; a vector is one row."""
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(_DTYPES[self.dtype][1]).itemsize


def read_header(path: Path) -> Dict[str, Slot]:
    """The tensors of a shard, checked against the file's size (a cut-off
    download is found here, before anything is converted)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise ShardError(f"{path}: not a safetensors file or truncated (header)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: cannot read safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + length
    slots = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{path}: bad header entry for {name}") from e
        if dtype not in _DTYPES:
            raise ShardError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        slot = Slot(path, dtype, shape, data_start + begin)
        if end - begin != slot.nbytes:
            raise ShardError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise ShardError(f"{path}: truncated ({size} bytes, tensor {name} ends at byte {data_start + end})")
        slots[name] = slot
    return slots


def read_rows(slot: Slot, start: int = 0, stop: Optional[int] = None) -> mx.array:
    """Rows [start, stop) of a tensor (all of it by default), read from disk.

    Plain reads, not a memory map: pages of a map stay in the process's
    resident memory after use, read() goes through the page cache only.
    """
    stop = slot.rows if stop is None else stop
    mlx_dtype, np_dtype = _DTYPES[slot.dtype]
    buffer = np.empty((stop - start) * slot.row_bytes, dtype=np.uint8)
    with open(slot.file, "rb") as f:
        f.seek(slot.offset + start * slot.row_bytes)
        if f.readinto(buffer) != buffer.nbytes:
            raise ShardError(f"{slot.file}: truncated")
    shape = ((stop - start),) + slot.shape[1:] if len(slot.shape) > 1 else slot.shape
    array = mx.array(buffer.view(np_dtype)).reshape(shape)
    return array.view(mlx_dtype) if mlx_dtype == mx.bfloat16 else array


class ShardWriter:
    """A shard whose header is written up front; tensors are then filled in by rows."""

    def __init__(self, path: Path, tensors: Iterable[Tuple[str, str, Tuple[int, ...]]]):
        """``tensors``: (name, safetensors dtype, shape), in file order."""
        header, slots, offset = {}, {}, 0
        for name, dtype, shape in tensors:
            slot = Slot(path, dtype, tuple(shape), offset)  # offset made absolute below
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + slot.nbytes]}
            slots[name] = slot
            offset += slot.nbytes
        header["__metadata__"] = {"format": "mlx"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        data_start = 8 + len(raw)
        self.path = path
        self.size = data_start + offset
        self.slots = {name: Slot(path, s.dtype, s.shape, data_start + s.offset) for name, s in slots.items()}
        self._unwritten = {name: s.nbytes for name, s in self.slots.items()}
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            os.close(self._fd)
            raise

    def write_rows(self, name: str, start: int, array: mx.array):
        """Write ``array`` as rows [start, start + len) of tensor ``name``."""
        slot = self.slots[name]
        expected = slot.shape[1:] if len(slot.shape) > 1 else slot.shape
        got = array.shape[1:] if len(slot.shape) > 1 else array.shape
        if tuple(got) != expected or dtype_name(array.dtype) != slot.dtype:
            raise ValueError(f"{name}: writing {array.dtype} {list(array.shape)} into {slot.dtype} {list(slot.shape)}")
        if array.dtype == mx.bfloat16:
            array = array.view(mx.uint16)
        data = memoryview(np.ascontiguousarray(np.array(array, copy=False))).cast("B")
        if start * slot.row_bytes + len(data) > slot.nbytes:
            raise ValueError(f"{name}: rows past the end of the tensor")
        position = slot.offset + start * slot.row_bytes
        while data:  # one pwrite may write less than asked (2 GB at most on Linux)
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written
        self._unwritten[name] -= position - (slot.offset + start * slot.row_bytes)

    def close(self):
        """Close the file; every byte of every tensor must have been written."""
        os.close(self._fd)
        missing = [name for name, left in self._unwritten.items() if left]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} tensors not fully written ({missing[0]}...)")
