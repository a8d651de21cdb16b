"""llama.cpp's own quantizer and dequantizer, called through ggml's C API (test oracle).

llama-cpp-python ships ggml's shared libraries next to its bindings (``llama_cpp/lib``); we load
``libggml-base`` with ctypes and call
  * ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` (no imatrix: the
    reference quantizers ``quantize_row_*_ref`` that ``llama-quantize`` runs without one),
  * ``ggml_get_type_traits(type)->to_float`` (what llama.cpp reads back from a file),
  * ``ggml_row_size``.
``VELOTUNE_GGML_BASE_LIB`` may point at a libggml-base.so to use instead (local debugging).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h of llama.cpp as vendored by llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def find_library() -> Path | None:
    """Path of libggml-base shipped with llama_cpp, or None when llama_cpp is not installed."""
    override = os.environ.get("VELOTUNE_GGML_BASE_LIB")
    if override:
        return Path(override)
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    return None


class GGML:
    """Thin ctypes wrapper over the three ggml functions the tests need."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def row_size(self, qtype: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(int(qtype), n_per_row))

    def quantize(self, x: np.ndarray, qtype: int) -> np.ndarray:
        """float32 (rows, cols) -> uint8 (rows, row_size) by llama.cpp's reference quantizer."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, self.row_size(qtype, cols)), dtype=np.uint8)
        written = self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        assert written == out.nbytes, (written, out.nbytes)
        return out

    def dequantize(self, data: np.ndarray, qtype: int, shape: tuple[int, int]) -> np.ndarray:
        """uint8 blocks -> float32 ``shape`` by llama.cpp's ``to_float`` for ``qtype``."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        n = int(np.prod(shape))
        out = np.empty(n, dtype=np.float32)
        traits = self.lib.ggml_get_type_traits(int(qtype)).contents
        assert traits.to_float, f"ggml has no to_float for type {qtype}"
        _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out.reshape(shape)


def load() -> GGML | None:
    """The oracle, or None when llama_cpp (and so ggml) is unavailable."""
    path = find_library()
    return GGML(path) if path is not None else None
