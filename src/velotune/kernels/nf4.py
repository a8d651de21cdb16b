"""NF4 dequantization (bitsandbytes layout) in one Triton pass, bit-exact to bitsandbytes.

Layout (see ``velotune.quant.nf4``): the weight flattened row-major, two 4-bit codes a byte with
the earlier element in the high nibble, one fp32 absmax per ``blocksize`` values. With double
quantization the absmax vector is itself 8-bit: absmax = nested_quant_map[q] * nested_absmax[
block // nested_blocksize] + offset. Output = quant_map[code] * absmax in fp32, cast once.

Bit-exactness: bitsandbytes does the nested product and the ``+ offset`` in two separate kernels,
so both are rounded; the kernel is launched with ``enable_fp_fusion=False`` so the compiler cannot
fuse them into one FMA (one rounding), which would differ in the last bit. Why a kernel at all:
the fused LoRA paths dequantize each base weight just in time, every step, in fwd and bwd; one
pass that reads 0.5 byte + 1/64 absmax per value and writes 2 bytes is the memory-bound floor.

Tiling: a program owns ``ROWS`` whole quantization blocks, a (ROWS, blocksize / 2) tile of packed
bytes. Each byte is loaded once and gives two outputs (high nibble first), each block's scale
(and its nested code/absmax) is loaded once per row instead of once per element, and
``tl.interleave`` puts the two nibbles' values back in order so the store is contiguous.

Per-call cost: QLoRA calls ``dequantize_nf4_weight`` for 7 weights per layer, 3 times per
micro-batch; on small models the step is bound by the host, so the launch arguments of each
weight (device-resident fp32 tables, grid, constexprs) are prepared once and cached per
bitsandbytes ``QuantState`` (see ``_CachedWeight``); a repeated call is a look-up, ``torch.empty``
and one launch.
"""

import weakref
from dataclasses import dataclass

import torch

from ._triton import jit, kernel_for, should_use_triton, tl

# Outputs per program: the best of bench_kernels.py's sweep on the H200 (4096 x 14336: 0.073 ms, 2.0 TB/s).
_TILE_VALUES = 8192
_NUM_WARPS = 4
_MIN_BLOCKSIZE = 16  # the Triton path needs a power of two >= 16 (bitsandbytes uses 32..4096)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit
def block_scales(ABSMAX, NESTED_ABSMAX, NESTED_MAP, OFFSET, blocks, ok, NESTED: tl.constexpr,
                 NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """fp32 absmax of quantization blocks `blocks` (any shape; `ok` masks them): stored, or with double
    quantization nested_map[q] * nested_absmax[block // NESTED_BLOCKSIZE] + offset, rounded as that reads."""
    if NESTED:
        q = tl.load(ABSMAX + blocks, mask=ok, other=0).to(tl.int32)
        nested_absmax = tl.load(NESTED_ABSMAX + blocks // NESTED_BLOCKSIZE, mask=ok, other=0.0)
        scale = tl.load(NESTED_MAP + q) * nested_absmax  # q in [0, 255]: no mask needed
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blocks, mask=ok, other=0.0)
    return scale  # one return: Triton types every return of a function, the other branch's too


@jit
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, OUT,  # PACKED (ceil(n/2),) uint8
    n, n_bytes, n_blocks,  # values, packed bytes = ceil(n/2), quantization blocks = ceil(n/BLOCKSIZE)
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,  # compile-time: divisions become shifts
    NESTED: tl.constexpr, OUT_BF16: tl.constexpr, ROWS: tl.constexpr,
    EVEN: tl.constexpr, IDX64: tl.constexpr,  # EVEN: every tile is full (no masks); IDX64: n >= 2**31
):  # fmt: skip
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (R,) quantization block indices
    byte_offs = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (R, BS/2)
    out_offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (R, BS)
    if EVEN:
        byte = tl.load(PACKED + byte_offs).to(tl.int32)  # (R, BS/2)
        if NESTED:
            q = tl.load(ABSMAX + rows).to(tl.int32)  # (R,)
            nested_absmax = tl.load(NESTED_ABSMAX + rows // NESTED_BLOCKSIZE)
        else:
            scale = tl.load(ABSMAX + rows)  # (R,) fp32
    else:
        row_ok = rows < n_blocks
        byte = tl.load(PACKED + byte_offs, mask=byte_offs < n_bytes, other=0).to(tl.int32)
        if NESTED:
            q = tl.load(ABSMAX + rows, mask=row_ok, other=0).to(tl.int32)
            nested_absmax = tl.load(NESTED_ABSMAX + rows // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        else:
            scale = tl.load(ABSMAX + rows, mask=row_ok, other=0.0)
    if NESTED:
        scale = tl.load(NESTED_MAP + q) * nested_absmax  # q in [0, 255]: no mask needed
        scale = scale + tl.load(OFFSET)  # a separate rounding, as bitsandbytes (no FMA: see launch)
    hi = tl.load(QUANT_MAP + (byte >> 4)) * scale[:, None]  # (R, BS/2) fp32, the earlier element
    lo = tl.load(QUANT_MAP + (byte & 15)) * scale[:, None]
    result = tl.interleave(hi, lo)  # (R, BS): hi0 lo0 hi1 lo1 ..., i.e. row-major order
    if OUT_BF16:
        # Round to nearest even by hand: the GPU's cvt does this, but Triton's interpreter truncates
        # fp32 -> bf16, and CI tests this kernel bit for bit through the interpreter. (No NaN here.)
        bits = result.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = result.to(OUT.dtype.element_ty)
    if EVEN:
        tl.store(OUT + out_offs, result)
    else:
        tl.store(OUT + out_offs, result, mask=out_offs < n)


def dequantize_nf4_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    blocksize: int = 64,
    nested_blocksize: int = 256,
    shape,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain PyTorch, the same rounding steps as bitsandbytes (fp32 products, one final cast)."""
    shape = torch.Size(shape)
    n = shape.numel()
    data = packed.reshape(-1).view(torch.uint8)  # (ceil(n/2),)
    codes = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n].long()  # (n,)
    block = torch.arange(n, device=packed.device) // blocksize  # (n,)
    if nested_absmax is not None:
        scales = nested_quant_map.float()[absmax.reshape(-1).long()]  # (n_blocks,)
        scales = scales * nested_absmax.float()[torch.arange(scales.numel(), device=packed.device) // nested_blocksize]
        scales = scales + torch.as_tensor(offset, dtype=torch.float32, device=packed.device)
    else:
        scales = absmax.reshape(-1).float()
    values = quant_map.float().to(packed.device)[codes] * scales[block]  # (n,) fp32
    return values.to(dtype).reshape(shape)


def _validate(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype):
    n = torch.Size(shape).numel()
    nested = [x is not None for x in (nested_absmax, nested_quant_map, offset)]
    if any(nested) and not all(nested):
        raise ValueError(
            "dequantize_nf4: double quantization needs nested_absmax, nested_quant_map and offset together "
            f"(got nested_absmax={nested[0]}, nested_quant_map={nested[1]}, offset={nested[2]})"
        )
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize_nf4: dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if quant_map.numel() != 16:
        raise ValueError(f"dequantize_nf4: quant_map must hold the 16 NF4 codes, got {quant_map.numel()} values")
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes < (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: shape {tuple(shape)} needs {(n + 1) // 2} packed bytes, got {n_bytes}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"dequantize_nf4: {n} values in blocks of {blocksize} need {-(-n // blocksize)} absmax entries, "
            f"got {absmax.numel()} (wrong blocksize?)"
        )
    if all(nested) and absmax.dtype != torch.uint8:
        raise ValueError(f"dequantize_nf4: with double quantization absmax must be uint8 codes, got {absmax.dtype}")


def _tileable(blocksize: int) -> bool:
    """The tile kernel's blocks are ``tl.arange`` ranges: a power of two, at least 16 values."""
    return blocksize >= _MIN_BLOCKSIZE and blocksize & (blocksize - 1) == 0


@dataclass(frozen=True, slots=True)
class _Launch:
    """One weight's launch, prepared once: device-resident fp32 tables, grid and constexprs.

    Calling it with the packed bytes (a contiguous uint8 tensor on ``device``) allocates the
    output and launches the kernel: no validation, no conversions, no dicts built.
    """

    kernel: object
    grid: tuple
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 codes when nested
    quant_map: torch.Tensor  # (16,) fp32
    nested_absmax: torch.Tensor  # (ceil(n_blocks / nested_blocksize),) fp32; placeholders when not nested
    nested_quant_map: torch.Tensor  # (256,) fp32
    offset: torch.Tensor  # (1,) fp32
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    cuda_index: int | None  # the kernel must run with the weight's GPU current (device_map over GPUs)
    n: int
    n_bytes: int
    n_blocks: int
    meta: dict  # constexprs and launch options, passed as keywords

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.n == 0:
            return out
        if self.cuda_index is not None and self.cuda_index != torch.cuda.current_device():
            with torch.cuda.device(self.cuda_index):
                self._run(packed, out)
        else:
            self._run(packed, out)
        return out

    def _run(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        self.kernel[self.grid](
            packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.offset, out,
            self.n, self.n_bytes, self.n_blocks, **self.meta,
        )  # fmt: skip


def _prepare(
    device, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, shape, dtype,
    *, tile_values: int = _TILE_VALUES, num_warps: int = _NUM_WARPS,
) -> _Launch:  # fmt: skip
    """Validated arguments -> a ``_Launch``. ``tile_values``/``num_warps`` are exposed for the bench's sweep."""
    shape = torch.Size(shape)
    n = shape.numel()
    quant_map = quant_map.to(device=device, dtype=torch.float32).contiguous()
    nested = nested_absmax is not None
    if nested:
        absmax = absmax.to(device).contiguous()  # uint8 codes
        nested_absmax = nested_absmax.to(device=device, dtype=torch.float32).contiguous()
        nested_quant_map = nested_quant_map.to(device=device, dtype=torch.float32).contiguous()
        offset = torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)
    else:
        absmax = absmax.to(device=device, dtype=torch.float32).contiguous()
        nested_absmax = nested_quant_map = offset = quant_map  # unused placeholders
    rows = max(1, tile_values // blocksize)  # quantization blocks per program
    n_blocks = -(-n // blocksize)
    meta = dict(
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested, OUT_BF16=dtype == torch.bfloat16,
        ROWS=rows, EVEN=n % (rows * blocksize) == 0, IDX64=n + rows * blocksize >= 2**31,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return _Launch(
        kernel=kernel_for(_dequantize_nf4_kernel), grid=(-(-n_blocks // rows),), absmax=absmax, quant_map=quant_map,
        nested_absmax=nested_absmax, nested_quant_map=nested_quant_map, offset=offset, shape=shape, dtype=dtype,
        device=device, cuda_index=device.index if device.type == "cuda" else None,
        n=n, n_bytes=(n + 1) // 2, n_blocks=n_blocks, meta=meta,
    )  # fmt: skip


def _plan(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, shape,
          dtype, use_triton) -> _Launch | None:  # fmt: skip
    """Validate; the prepared Triton launch, or None when the PyTorch reference is to run."""
    if int(blocksize) < 2 or int(nested_blocksize) < 1:
        raise ValueError(
            f"dequantize_nf4: blocksize ({blocksize}) and nested_blocksize ({nested_blocksize}) must be positive"
        )
    blocksize, nested_blocksize = int(blocksize), int(nested_blocksize)
    _validate(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype)
    if not should_use_triton(packed, use_triton):
        return None
    if not _tileable(blocksize):
        if use_triton:
            raise ValueError(
                f"dequantize_nf4: the Triton kernel needs a blocksize that is a power of two >= {_MIN_BLOCKSIZE} "
                f"(bitsandbytes uses 32..4096), got {blocksize}; pass use_triton=None/False for the PyTorch path"
            )
        return None
    return _prepare(
        packed.device, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
        shape, dtype,
    )  # fmt: skip


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    blocksize: int = 64,
    nested_blocksize: int = 256,
    shape,
    dtype: torch.dtype,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """NF4 -> ``dtype`` tensor of ``shape``, equal bit for bit to bitsandbytes' ``dequantize_4bit``.

    ``packed`` is the uint8 (or any quant_storage dtype) data, ``absmax`` fp32 per block, or uint8
    codes when ``nested_*`` and ``offset`` (double quantization) are given. No autograd: frozen
    base weights only. Validates every call; weights held by bitsandbytes modules should go through
    ``dequantize_nf4_weight``, which prepares the launch once per weight.
    """
    launch = _plan(
        packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, shape,
        dtype, use_triton,
    )  # fmt: skip
    if launch is None:
        return dequantize_nf4_reference(
            packed, absmax, quant_map, nested_absmax=nested_absmax, nested_quant_map=nested_quant_map,
            offset=offset, blocksize=int(blocksize), nested_blocksize=int(nested_blocksize), shape=shape, dtype=dtype,
        )  # fmt: skip
    return launch(packed.reshape(-1).view(torch.uint8).contiguous())  # (ceil(n/2),)


@dataclass(frozen=True, slots=True)
class _CachedWeight:
    """A prepared launch and what it was prepared from; stale as soon as any of these changed.

    The QuantState is held weakly (its death drops the entry); its tensors are held strongly and
    compared by identity, so ``state.to(device)`` or a reassigned ``state.absmax`` is noticed.
    The packed bytes are never cached, only their address: ``param.data = ...`` (or a move)
    changes it. In-place edits of the packed bytes are always seen; in-place edits of absmax/code
    are seen too when they needed no conversion (bitsandbytes keeps them fp32 on the weight's
    device), as the launch then uses the state's own tensors.
    """

    state_ref: weakref.ref
    data_ptr: int
    data_numel: int
    data_dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: object
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    launch: _Launch

    def fresh(self, state, data: torch.Tensor) -> bool:
        if not (
            self.state_ref() is state
            and data.data_ptr() == self.data_ptr
            and data.dtype is self.data_dtype
            and data.numel() == self.data_numel
            and state.absmax is self.absmax
            and state.code is self.code
            and state.offset is self.offset
            and state.dtype is self.dtype
            and state.blocksize == self.blocksize
            and state.shape == self.shape
        ):
            return False
        state2 = state.state2
        if state2 is None:
            return self.nested_absmax is None
        return state2.absmax is self.nested_absmax and state2.code is self.nested_code


_CACHE: dict[int, _CachedWeight] = {}  # id(QuantState) -> entry (QuantState defines __eq__, so no __hash__)
_DISABLE_SUBCLASS = torch._C.DisableTorchFunctionSubclass


def _forget(key: int):
    def callback(_ref) -> None:  # the QuantState died: its id may be reused
        _CACHE.pop(key, None)

    return callback


def _weight_state(module_or_param):
    param = module_or_param.weight if isinstance(module_or_param, torch.nn.Module) else module_or_param
    state = getattr(param, "quant_state", None)
    if state is None and isinstance(module_or_param, torch.nn.Module):
        state = getattr(module_or_param, "quant_state", None)
    if state is None:
        raise ValueError(
            f"dequantize_nf4_weight: {type(module_or_param).__name__} carries no bitsandbytes quant_state; "
            "pass a bnb.nn.Linear4bit or its Params4bit weight (after quantization)"
        )
    # Params4bit overrides __torch_function__, which makes each .data/.data_ptr() cost microseconds
    with _DISABLE_SUBCLASS():
        data = param.data  # a plain tensor aliasing the packed bytes
    return data, state


def dequantize_nf4_weight(module_or_param, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes ``Params4bit`` (or a ``Linear4bit`` holding one) via its quant_state.

    The first call on a weight validates and prepares its launch; later calls reuse it (see
    ``_CachedWeight`` for when it is rebuilt), so the QLoRA hot path is a look-up and one launch.
    """
    packed, launch, state, nested = prepared_nf4_weight(module_or_param, use_triton=use_triton)
    if launch is None:
        return dequantize_nf4_reference(
            packed, state.absmax, state.code, blocksize=state.blocksize, shape=state.shape, dtype=state.dtype, **nested
        )
    return launch(packed)


def prepared_nf4_weight(module_or_param, *, use_triton: bool | None = None):
    """(packed, launch, quant_state, nested kwargs) of a bitsandbytes 4-bit weight, validated once.

    ``launch`` is the weight's prepared ``_Launch`` (its device-resident fp32 tables and
    constexprs, which the fused NF4 GEMV reads too) and ``packed`` its bytes as a flat contiguous
    uint8 tensor; ``launch`` is None when the PyTorch reference is to run, and ``packed`` is then
    the weight's data as stored. ``nested``: the reference's double-quantization keywords."""
    data, state = _weight_state(module_or_param)
    if use_triton is not False:
        cached = _CACHE.get(id(state))
        if cached is not None and cached.fresh(state, data):
            return (data if cached.data_dtype is torch.uint8 else data.view(torch.uint8)), cached.launch, state, None
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4_weight: only quant_type='nf4' is supported, got {state.quant_type!r}")
    state2 = state.state2
    nested = dict(nested_absmax=None, nested_quant_map=None, offset=None, nested_blocksize=256)
    if state2 is not None:
        nested = dict(
            nested_absmax=state2.absmax, nested_quant_map=state2.code, offset=state.offset,
            nested_blocksize=state2.blocksize,
        )  # fmt: skip
    launch = _plan(
        data, state.absmax, state.code, nested["nested_absmax"], nested["nested_quant_map"], nested["offset"],
        state.blocksize, nested["nested_blocksize"], state.shape, state.dtype, use_triton,
    )  # fmt: skip
    if launch is None:
        return data, None, state, nested
    if not data.is_contiguous():  # rare: not worth caching a copy
        return data.reshape(-1).view(torch.uint8).contiguous(), launch, state, nested
    key = id(state)
    _CACHE[key] = _CachedWeight(
        state_ref=weakref.ref(state, _forget(key)), data_ptr=data.data_ptr(), data_numel=data.numel(),
        data_dtype=data.dtype, absmax=state.absmax, code=state.code,
        nested_absmax=None if state2 is None else state2.absmax, nested_code=None if state2 is None else state2.code,
        offset=state.offset, blocksize=state.blocksize, shape=state.shape, dtype=state.dtype, launch=launch,
    )  # fmt: skip
    return (data if data.dtype is torch.uint8 else data.view(torch.uint8)), launch, state, nested
