"""NF4 (bitsandbytes layout) straight to FP8 e4m3 with row-wise scales, in one Triton pass.

Why: NF4 storage with FP8 compute (fast/fp8_matmul.py) needs each base weight as e4m3 values
plus one fp32 scale per output row, just in time, in forward and backward. Dequantizing to bf16
and quantizing that again would write and read 2 bytes per value twice; this kernel reads the
packed 4-bit codes (and the block scales, nested or not) once and writes 1 byte per value.

Math: w = quant_map[code] * absmax[block] (fp32, exactly as kernels/nf4.py and bitsandbytes)
and e4m3 = clamp(w * inv_row[row], +-448) where inv_row = 448 / max_k |w[row, k]|. The row
scales (row_absmax / 448) depend only on the frozen weight, so they are computed once per
weight (from its block scales, see `_row_absmax`) and cached per bitsandbytes QuantState;
afterwards a call is the kernel launch alone.

Tiling: when quantization blocks do not straddle rows (in_features % blocksize == 0, every
Llama-style shape) a program owns a (rows, columns) tile (`_nf4_to_fp8_rows_kernel`, `ROW_TILE`): one
inverse-scale load a row, one scale load a block. Other shapes take the flat kernel: as kernels/nf4.py,
a program owns `ROWS` whole quantization blocks and each output value looks up its row's inverse scale
(row = flat index // in_features).
`transposed=True` writes the (in, out) layout of the FP8 backward instead, through the tiled kernel
of nf4_fp8_transposed.py (same math per value, same cached row scales).
"""

import weakref

import torch

from ._triton import jit, kernel_for, should_use_triton, tl
from .fp8 import FP8_DTYPE, FP8_MAX, TINY, round_to_e4m3
from .fp8_transpose import transpose_bytes
from .nf4 import _weight_state, block_scales, dequantize_nf4
from .nf4_fp8_transposed import nf4_fp8_tile, nf4_to_fp8_transposed_reference, transposed_launch

_TILE_VALUES = 8192  # the flat kernel (blocks straddling rows): values a program
_NUM_WARPS = 4
# The tiled kernel's (BLOCK_R, BLOCK_C, num_warps): 8192 values a program as the flat kernel; rows of 512
# columns (eight 64-value blocks, 256 contiguous output bytes a row). sm_90 SASS is the same for the
# other shapes of 8192 (bench_fp8.py `kernels` times a few: `nf4_rows_tiles_ms`).
ROW_TILE = (16, 512, 4)


@jit
def _nf4_to_fp8_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, OUT,  # INV_ROW (out,) fp32
    n, n_bytes, n_blocks, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr,
    IDX64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    blocks = pid * ROWS + tl.arange(0, ROWS)  # (R,) quantization block indices
    byte_offs = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (R, BS/2)
    out_offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (R, BS)
    block_ok = blocks < n_blocks
    byte = tl.load(PACKED + byte_offs, mask=byte_offs < n_bytes, other=0).to(tl.int32)
    scale = block_scales(ABSMAX, NESTED_ABSMAX, NESTED_MAP, OFFSET, blocks, block_ok, NESTED, NESTED_BLOCKSIZE)
    hi = tl.load(QUANT_MAP + (byte >> 4)) * scale[:, None]  # (R, BS/2) fp32
    lo = tl.load(QUANT_MAP + (byte & 15)) * scale[:, None]
    w = tl.interleave(hi, lo)  # (R, BS) in row-major order
    in_range = out_offs < n
    inv = tl.load(INV_ROW + out_offs // n_cols, mask=in_range, other=0.0)  # (R, BS) the row's 448 / absmax
    y = round_to_e4m3(w * inv)  # saturates at +-448 (the reference's clamp)
    tl.store(OUT + out_offs, y.to(OUT.dtype.element_ty), mask=in_range)


@jit
def _nf4_to_fp8_rows_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, OUT,  # OUT (out, in) e4m3
    n_rows, row_blocks,  # the weight's out_features, and in_features // BLOCKSIZE (blocks never straddle rows)
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """The row-major conversion tiled as nf4_fp8_transposed.py's kernel (whose reads and math it shares):
    a program owns a (BLOCK_R rows, BLOCK_C columns) tile, so each row's inverse scale is one load and
    each block's scale one load broadcast over the block, where the flat kernel above divides every
    value's flat index by in_features and gathers its row's scale (sm_90 SASS: 28 instructions and two
    gathers a value there). The store is row-major, no permutation."""
    y, _, _, _, _, blocks, block_ok = nf4_fp8_tile(
        PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, INV_ROW, n_rows, row_blocks,
        BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, BLOCK_R, BLOCK_C, IDX64)  # y (BR, NB, BS)
    out_offs = blocks[:, :, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, None, :]  # (BR, NB, BS) row-major
    tl.store(OUT + out_offs, y.to(OUT.dtype.element_ty), mask=block_ok[:, :, None])


class _RowScales:
    """One weight's cached row scales: (scale (out,) fp32, inv (out,) fp32), valid while the
    QuantState lives and the packed bytes stay at the same address."""

    __slots__ = ("state_ref", "data_ptr", "scale", "inv", "args", "launch", "launch_t")

    def __init__(self, state, data, scale, inv, args):
        self.state_ref, self.data_ptr = weakref.ref(state), data.data_ptr()
        self.scale, self.inv, self.args = scale, inv, args
        # (kernel, grid, shape, device, scalar args, meta), set at the first Triton call: `launch` writes
        # (out, in), `launch_t` the transposed (in, out) layout (nf4_fp8_transposed.py)
        self.launch = self.launch_t = None

    def fresh(self, state, data) -> bool:
        return self.state_ref() is state and self.data_ptr == data.data_ptr()

    def run(self, data: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The prepared launch: one allocation and one kernel (the per-call host work of QLoRA's hot path)."""
        kernel, grid, shape, device, scalars, meta = self.launch_t if transposed else self.launch
        out = torch.empty(shape, dtype=FP8_DTYPE, device=device)
        code, absmax, nested_absmax, nested_map, offset = self.args
        kernel[grid](data.reshape(-1).view(torch.uint8), absmax, code, nested_absmax, nested_map, offset, self.inv,
                     out.view(torch.uint8) if transposed else out, *scalars, **meta)
        return out


_CACHE: dict[int, _RowScales] = {}


def _nested(state) -> dict:
    state2 = state.state2
    if state2 is None:
        return dict(nested_absmax=None, nested_quant_map=None, offset=None, nested_blocksize=256)
    return dict(nested_absmax=state2.absmax, nested_quant_map=state2.code, offset=state.offset,
                nested_blocksize=state2.blocksize)


def _row_scales(param, data, state, use_triton) -> _RowScales:
    """The weight's row scales (computed once from an fp32 dequantization) and launch tables."""
    entry = _CACHE.get(id(state))
    if entry is not None and entry.fresh(state, data):
        return entry
    nested = _nested(state)
    amax = _row_absmax(data, state, nested, use_triton).clamp_min(TINY)  # (out,)
    scale, inv = amax / FP8_MAX, FP8_MAX / amax
    device = data.device
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    if nested["nested_absmax"] is not None:
        tables = (state.absmax.to(device).contiguous(),
                  nested["nested_absmax"].to(device=device, dtype=torch.float32).contiguous(),
                  nested["nested_quant_map"].to(device=device, dtype=torch.float32).contiguous(),
                  torch.as_tensor(nested["offset"], dtype=torch.float32, device=device).reshape(1))
    else:
        tables = (state.absmax.to(device=device, dtype=torch.float32).contiguous(), code, code, code)
    key = id(state)
    entry = _CACHE[key] = _RowScales(state, data, scale, inv, (code, *tables))
    weakref.finalize(state, _CACHE.pop, key, None)
    return entry


def _row_absmax(data, state, nested: dict, use_triton) -> torch.Tensor:
    """max_k |w[row, k]| (out,) fp32 of an NF4 weight.

    When quantization blocks do not straddle rows (in_features % blocksize == 0, every Llama-style
    shape) it is the largest block scale of the row: quantizing divides each block by its absmax,
    so the block's largest value becomes code +-1 and dequantizes to exactly +-absmax (bitsandbytes
    and quant/nf4.py alike). That reads n / blocksize scales instead of materialising the weight in
    fp32 (235 MB for an 8B MLP weight, which would land on the first step's memory peak). Other
    shapes dequantize the weight once."""
    out_features, in_features = state.shape
    if in_features % state.blocksize:
        w = dequantize_nf4(data, state.absmax, state.code, blocksize=state.blocksize, shape=state.shape,
                           dtype=torch.float32, use_triton=use_triton, **nested)  # (out, in) fp32, once
        return w.abs().amax(dim=1)
    absmax = state.absmax.reshape(-1)
    if nested["nested_absmax"] is not None:  # double quantization: 8-bit codes of the block scales
        blocks = torch.arange(absmax.numel(), device=absmax.device) // nested["nested_blocksize"]
        absmax = nested["nested_quant_map"].float()[absmax.long()] * nested["nested_absmax"].float()[blocks]
        absmax = absmax + torch.as_tensor(nested["offset"], dtype=torch.float32, device=absmax.device)
    return absmax.float().abs().view(out_features, in_features // state.blocksize).amax(dim=1).to(data.device)


def nf4_to_fp8_reference(w: torch.Tensor, inv_row: torch.Tensor) -> torch.Tensor:
    """A dense fp32 weight (out, in) and its (out,) inverse row scales -> (out, in) e4m3."""
    return (w.float() * inv_row.reshape(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_nf4_to_fp8(param, *, transposed: bool = False,
                          use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitsandbytes Params4bit (or Linear4bit) -> (e4m3 (out, in), row scales (out,) fp32).

    weight ~= e4m3.float() * scale[:, None]. `transposed`: the e4m3 values as (in, out) row-major instead
    (the FP8 backward's layout), bit-identical to the untransposed values' `.t().contiguous()`, written
    directly (nf4_fp8_transposed.py). The Triton kernels run on CUDA (and the interpreter); elsewhere the
    fp32 dequantization is scaled and cast in PyTorch (the same math).
    """
    data, state = _weight_state(param)
    entry = _CACHE.get(id(state))
    if entry is not None and use_triton is not False and entry.fresh(state, data):
        if (entry.launch_t if transposed else entry.launch) is not None:
            return entry.run(data, transposed), entry.scale
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4_to_fp8: only quant_type='nf4' is supported, got {state.quant_type!r}")
    rows = _row_scales(param, data, state, use_triton)
    if not should_use_triton(data, use_triton) or state.blocksize < 16 or state.blocksize & (state.blocksize - 1):
        w = dequantize_nf4(data, state.absmax, state.code, blocksize=state.blocksize, shape=state.shape,
                           dtype=torch.float32, use_triton=False, **_nested(state))
        reference = nf4_to_fp8_transposed_reference if transposed else nf4_to_fp8_reference
        return reference(w, rows.inv), rows.scale
    nested_blocksize = _nested(state)["nested_blocksize"]
    if transposed:
        plan = transposed_launch(tuple(state.shape), state.blocksize, nested_blocksize, state.state2 is not None)
        if plan is None:  # blocks straddling rows: convert row-major, then transpose the bytes
            values, scale = dequantize_nf4_to_fp8(param, use_triton=use_triton)
            return transpose_bytes(values, use_triton=use_triton), scale
        kernel, grid, shape, scalars, meta = plan
        rows.launch_t = (kernel_for(kernel), grid, shape, data.device, scalars, meta)
        return rows.run(data, transposed=True), rows.scale
    out_features, in_features = state.shape
    blocksize = state.blocksize
    block_r, block_c, warps = ROW_TILE
    if in_features % blocksize == 0 and blocksize <= block_c:  # the tiled kernel: whole blocks in every row
        grid = (-(-out_features // block_r), -(-in_features // block_c))
        meta = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=state.state2 is not None,
                    BLOCK_R=block_r, BLOCK_C=block_c, IDX64=(out_features + block_r) * (in_features + block_c) >= 2**31,
                    num_warps=warps, enable_fp_fusion=False)
        rows.launch = (kernel_for(_nf4_to_fp8_rows_kernel), grid, state.shape, data.device,
                       (out_features, in_features // blocksize), meta)
        return rows.run(data), rows.scale
    n = out_features * in_features
    per_program = max(1, _TILE_VALUES // blocksize)
    n_blocks = -(-n // blocksize)
    meta = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
                NESTED=state.state2 is not None, ROWS=per_program, IDX64=n + per_program * blocksize >= 2**31,
                num_warps=_NUM_WARPS, enable_fp_fusion=False)
    rows.launch = (kernel_for(_nf4_to_fp8_kernel), (-(-n_blocks // per_program),), state.shape, data.device,
                   (n, (n + 1) // 2, n_blocks, in_features), meta)
    return rows.run(data), rows.scale
