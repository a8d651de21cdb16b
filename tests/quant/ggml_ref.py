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
        if int(qtype) == 0:  # GGML_TYPE_F32 has no to_float: the bytes are the values
            return data.view(np.float32).reshape(shape).copy()
        out = np.empty(n, dtype=np.float32)
        traits = self.lib.ggml_get_type_traits(int(qtype)).contents
        assert traits.to_float, f"ggml has no to_float for type {qtype}"
        _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out.reshape(shape)


def load() -> GGML | None:
    """The oracle, or None when llama_cpp (and so ggml) is unavailable."""
    path = find_library()
    return GGML(path) if path is not None else None


# ---- llama.cpp's per-tensor type choice (llama-ext.h: llama_quant_compute_types) -------------


class _QuantParams(ctypes.Structure):
    """``struct llama_model_quantize_params`` (llama.h, llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int),
        ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int),
        ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool),
        ("only_copy", ctypes.c_bool),
        ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("tt_overrides", ctypes.c_void_p),
        ("prune_layers", ctypes.c_void_p),
        ("max_buf_size", ctypes.c_size_t),
    ]


class _ModelDesc(ctypes.Structure):
    """``struct llama_quant_model_desc`` (src/llama-ext.h)."""

    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (name, ctypes.c_uint32)
        for name in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


class _InitParams(ctypes.Structure):
    """``struct ggml_init_params``."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _cxx(lib: ctypes.CDLL, mangled: str, restype, argtypes):
    """A C++-mangled export of libllama (llama-ext.h has no extern "C")."""
    fn = getattr(lib, mangled)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


class LlamaQuantRules:
    """Asks llama.cpp which GGML type each tensor of a (mock) model gets under a file type.

    Uses the test hooks llama.cpp exports for exactly this (``llama_quant_model_from_metadata``,
    ``llama_quant_init``, ``llama_quant_compute_types``) on metadata-only ggml tensors.
    """

    def __init__(self, ggml_base: Path):
        lib_dir = ggml_base.parent
        self.base = ctypes.CDLL(str(ggml_base))
        names = [p for p in ("libllama.so", "libllama.dylib", "llama.dll") if (lib_dir / p).exists()]
        if not names:
            raise FileNotFoundError(f"no libllama next to {ggml_base}")
        self.llama = ctypes.CDLL(str(lib_dir / names[0]))
        self.base.ggml_init.restype = ctypes.c_void_p
        self.base.ggml_init.argtypes = [_InitParams]
        self.base.ggml_free.argtypes = [ctypes.c_void_p]
        self.base.ggml_new_tensor_2d.restype = ctypes.c_void_p
        self.base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self.base.ggml_new_tensor_1d.restype = ctypes.c_void_p
        self.base.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        self.base.ggml_set_name.restype = ctypes.c_void_p
        self.base.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.llama.llama_model_quantize_default_params.restype = _QuantParams
        self.llama.llama_model_free.argtypes = [ctypes.c_void_p]
        vp = ctypes.c_void_p
        self.from_metadata = _cxx(self.llama, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
                                  vp, [ctypes.POINTER(_ModelDesc)])
        self.init = _cxx(self.llama, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
                         vp, [vp, ctypes.POINTER(_QuantParams)])
        self.free = _cxx(self.llama, "_Z16llama_quant_freeP19quantize_state_impl", None, [vp])
        self.allows = _cxx(self.llama, "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
                           ctypes.c_bool, [vp, vp])
        self.compute = _cxx(self.llama, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
                            None, [vp, ctypes.c_int, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t])

    def types(self, ftype: int, tensors: list[tuple[str, tuple[int, ...]]], *, n_layer: int, n_head: int,
              n_head_kv: int, n_embd: int, n_ff: int, arch: str = "llama") -> dict[str, int | None]:
        """name -> GGML type llama.cpp picks (None: a tensor llama.cpp leaves as it is in the source)."""
        desc = _ModelDesc(arch.encode(), n_embd, n_ff, n_layer, n_head, n_head_kv, 0,
                          n_embd // n_head, n_embd // n_head)
        model = self.from_metadata(ctypes.byref(desc))
        params = self.llama.llama_model_quantize_default_params()
        params.ftype = ftype
        qs = self.init(model, ctypes.byref(params))
        ctx = self.base.ggml_init(_InitParams(1 << 24, None, True))  # metadata only
        try:
            handles = []
            for name, shape in tensors:
                if len(shape) == 1:
                    t = self.base.ggml_new_tensor_1d(ctx, 1, shape[0])
                else:  # torch (rows, cols) -> ggml ne = (cols, rows)
                    t = self.base.ggml_new_tensor_2d(ctx, 1, shape[-1], shape[0])
                self.base.ggml_set_name(t, name.encode())
                handles.append(t)
            chosen = [h for h in handles if self.allows(qs, h)]
            arr = (ctypes.c_void_p * len(chosen))(*chosen)
            out = (ctypes.c_int * len(chosen))()
            self.compute(qs, ftype, arr, out, len(chosen))
            picked = dict(zip(chosen, out))
            return {name: picked.get(h) for (name, _), h in zip(tensors, handles)}
        finally:
            self.base.ggml_free(ctx)
            self.free(qs)
            self.llama.llama_model_free(model)


def load_rules() -> LlamaQuantRules | None:
    """llama.cpp's type-choice oracle, or None when llama_cpp is unavailable."""
    path = find_library()
    return LlamaQuantRules(path) if path is not None else None
