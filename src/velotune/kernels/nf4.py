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
"""

import torch

from ._triton import jit, kernel_for, should_use_triton, tl

_BLOCK = 1024
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP, OFFSET, OUT,  # PACKED (ceil(n/2),) uint8
    n,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,  # compile-time: divisions become shifts
    NESTED: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(PACKED + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)  # first element in the high nibble
    value = tl.load(QUANT_MAP + nibble, mask=mask, other=0.0)
    block = offs // BLOCKSIZE
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_MAP + q, mask=mask, other=0.0) * tl.load(
            NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=mask, other=0.0
        )
        scale = scale + tl.load(OFFSET)  # a separate rounding, as bitsandbytes (no FMA: see launch)
    else:
        scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
    result = value * scale  # fp32
    if OUT_BF16:
        # Round to nearest even by hand: the GPU's cvt does this, but Triton's interpreter truncates
        # fp32 -> bf16, and CI tests this kernel bit for bit through the interpreter. (No NaN here.)
        bits = result.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(OUT + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(OUT + offs, result.to(OUT.dtype.element_ty), mask=mask)


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
    base weights only.
    """
    if int(blocksize) < 2 or int(nested_blocksize) < 1:
        raise ValueError(
            f"dequantize_nf4: blocksize ({blocksize}) and nested_blocksize ({nested_blocksize}) must be positive"
        )
    blocksize, nested_blocksize = int(blocksize), int(nested_blocksize)
    _validate(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype)
    kwargs = dict(
        nested_absmax=nested_absmax, nested_quant_map=nested_quant_map, offset=offset,
        blocksize=blocksize, nested_blocksize=nested_blocksize, shape=shape, dtype=dtype,
    )  # fmt: skip
    if not should_use_triton(packed, use_triton):
        return dequantize_nf4_reference(packed, absmax, quant_map, **kwargs)
    device = packed.device
    out = torch.empty(torch.Size(shape), dtype=dtype, device=device)
    n = out.numel()
    data = packed.reshape(-1).view(torch.uint8).contiguous()  # (ceil(n/2),)
    quant_map = quant_map.to(device=device, dtype=torch.float32).contiguous()
    nested = nested_absmax is not None
    if nested:
        nested_absmax = nested_absmax.to(device=device, dtype=torch.float32).contiguous()
        nested_quant_map = nested_quant_map.to(device=device, dtype=torch.float32).contiguous()
        offset = torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)
    else:
        absmax = absmax.to(dtype=torch.float32)
        nested_absmax = nested_quant_map = offset = quant_map  # unused placeholders
    absmax = absmax.to(device).contiguous()
    if n:
        kernel_for(_dequantize_nf4_kernel)[(-(-n // _BLOCK),)](
            data, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, n,
            BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
            OUT_BF16=dtype == torch.bfloat16, BLOCK=_BLOCK, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def dequantize_nf4_weight(module_or_param, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes ``Params4bit`` (or a ``Linear4bit`` holding one) via its quant_state."""
    param = module_or_param.weight if isinstance(module_or_param, torch.nn.Module) else module_or_param
    state = getattr(param, "quant_state", None)
    if state is None and isinstance(module_or_param, torch.nn.Module):
        state = getattr(module_or_param, "quant_state", None)
    if state is None:
        raise ValueError(
            f"dequantize_nf4_weight: {type(module_or_param).__name__} carries no bitsandbytes quant_state; "
            "pass a bnb.nn.Linear4bit or its Params4bit weight (after quantization)"
        )
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4_weight: only quant_type='nf4' is supported, got {state.quant_type!r}")
    nested = {}
    if state.nested:
        nested = dict(
            nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code, offset=state.offset,
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    return dequantize_nf4(
        param.data, state.absmax, state.code, blocksize=state.blocksize, shape=state.shape, dtype=state.dtype,
        use_triton=use_triton, **nested,
    )  # fmt: skip
