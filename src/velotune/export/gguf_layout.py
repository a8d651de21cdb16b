"""Where every byte of a GGUF file should be, read from its header alone.

`gguf.GGUFReader` maps the tensors straight out of the file; on a truncated file that fails with
numpy's "cannot reshape array of size ...", which says nothing about what happened. This reads
the header (key/value pairs and tensor infos) with bounds checks, so a file cut short is named
as truncated, with the size its header promises and the size it has.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFFileError(ValueError):
    """The file is not a complete GGUF file (truncated, or not GGUF at all)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (row length) first
    qtype: gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    path: Path
    tensors: tuple[TensorInfo, ...]
    data_start: int
    expected_size: int  # data_start + the end of the last tensor, padded to the alignment
    actual_size: int
    metadata: dict = field(default_factory=dict)  # key -> value (str, int/float/bool, or a list of them)

    def data(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes, mapped from the file (read-only)."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + tensor.offset,
                         shape=(tensor.nbytes,))


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise GGUFFileError(
                f"{self.path} is truncated: its header ends before {what} (needs byte {self.pos + n:,}, the file "
                f"has {len(self.buf):,} bytes). The file was cut short (interrupted copy or download, full disk); "
                "export or copy it again.")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.unpack("Q", what), what)

    def value(self, vtype: int, what: str) -> object:
        if vtype == _STRING:
            return self.string(what).decode("utf-8", "replace")
        if vtype == _ARRAY:
            item_type, count = self.unpack("I", what), self.unpack("Q", what)
            if item_type in _NUMPY:
                raw = self.take(_SCALARS[item_type] * count, what)
                return np.frombuffer(raw, dtype=_NUMPY[item_type]).tolist()
            return [self.value(item_type, what) for _ in range(count)]
        if vtype not in _NUMPY:
            raise GGUFFileError(f"{self.path}: unknown value type {vtype} in {what}; the file is damaged")
        return np.frombuffer(self.take(_SCALARS[vtype], what), dtype=_NUMPY[vtype])[0].item()


def read_layout(path: str | Path) -> GGUFLayout:
    """The header of `path`; raises `GGUFFileError` naming truncation or a non-GGUF file."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFFileError(f"{path} is truncated: {size} bytes, shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if cur.take(4, "the magic") != MAGIC:
            raise GGUFFileError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        cur.unpack("I", "the version")
        n_tensors, n_kv = cur.unpack("Q", "the tensor count"), cur.unpack("Q", "the key count")
        metadata = {}
        for i in range(n_kv):
            key = cur.string(f"key {i}").decode("utf-8", "replace")
            metadata[key] = cur.value(cur.unpack("I", f"the type of {key}"), key)
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info {i}").decode("utf-8", "replace")
            dims = tuple(cur.unpack("Q", name) for _ in range(cur.unpack("I", name)))
            qtype = gguf.GGMLQuantizationType(cur.unpack("I", name))
            offset = cur.unpack("Q", name)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in dims:
                n *= d
            infos.append(TensorInfo(name, dims, qtype, offset, n // block * type_size))
        data_start = -(-cur.pos // alignment) * alignment
    end = max((t.offset + t.nbytes for t in infos), default=0)
    expected = data_start + end
    if size < expected:
        last = max(infos, key=lambda t: t.offset + t.nbytes)
        cut = [t.name for t in infos if data_start + t.offset + t.nbytes > size]
        raise GGUFFileError(
            f"{path} is truncated: its header describes {expected:,} bytes but the file has {size:,} "
            f"({expected - size:,} missing; {len(cut)} tensor(s) incomplete, e.g. {cut[0]}, last {last.name}). "
            "It was cut short (interrupted copy or download, full disk); export or copy it again.")
    return GGUFLayout(path, tuple(infos), data_start, data_start + -(-end // alignment) * alignment, size, metadata)
