"""NF4 (QLoRA 4-bit) quantization in pure torch, bit-exact to bitsandbytes' format and kernels.

Layout (what ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` produces):
  * the weight is flattened row-major and cut into blocks of ``blocksize`` (64) values;
  * each block is multiplied by 1/absmax(block) and every value mapped to the nearest of the 16
    NF4 codes (thresholds = fp32 midpoints of neighbouring codes; a value exactly on a
    threshold takes the lower code, as the CUDA kernel's ``x > t`` decision tree does);
  * two codes a byte, the earlier element in the high nibble; packed shape ((n + 1) // 2, 1);
  * with ``compress_statistics`` ("double quantization") the fp32 absmax vector is stored as
    8-bit codes of bitsandbytes' dynamic map (block 256) after subtracting its mean.

Why our own code and not bitsandbytes' kernels: it runs wherever torch runs, it is the reference
the Triton kernel is tested against, and the format stays readable in one file. The modules that
hold the result are still bitsandbytes' ``Linear4bit``/``Params4bit`` (PEFT and TRL know them).

bitsandbytes' CPU and CUDA paths differ in three corner cases; ``backend`` picks whose output to
reproduce (``"auto"``: the one bitsandbytes would itself run for the tensor's device):
  1. double quantization rounding (see ``blockwise8``): CUDA = nearest code, CPU = 65536-point
     table (differs for ~0.15% of absmax codes);
  2. an all-zero block: CUDA computes 0 * (1/0) = NaN and writes code 0 (-1.0), CPU writes code 7
     (0.0); both dequantize to exactly 0;
  3. the last, partial block: CPU divides by its absmax instead of multiplying by the
     reciprocal (can differ by one ulp, so rarely one code).
``dequantize_nf4_state`` has no such choice: both backends compute code * absmax in fp32, then cast.
"""

from __future__ import annotations

import torch

from velotune.quant.blockwise8 import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit

# The 16 NF4 codes (QLoRA, "normal float"), as fp32; index = the 4-bit value stored.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
# Decision thresholds: fp32 midpoints, equal bit for bit to the constants of the CUDA kernel.
NF4_THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

NESTED_BLOCKSIZE = 256
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cpu" if device.type == "cpu" else "cuda"
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'cuda', got {backend!r}")
    return backend


def _nf4_codes(weight: torch.Tensor, blocksize: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit indices (n,) uint8 and per-block absmax (n_blocks,) fp32 of a weight."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    n_full = n - n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, (-n) % blocksize)).view(-1, blocksize)  # (B, bs)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    if backend == "cuda":
        scaled = blocks * (1.0 / absmax).unsqueeze(1)  # zero block -> NaN -> code 0
    else:
        scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # zero block -> code 7
        if n_full < n:  # bitsandbytes' CPU path divides in the partial block
            tail = flat[n_full:] / absmax[-1].clamp(min=1e-38)
            scaled = scaled.reshape(-1)
            scaled[n_full:n] = tail
            scaled = scaled.view(-1, blocksize)
    scaled = scaled.reshape(-1)[:n]
    return _count_thresholds_below(scaled), absmax


def _count_thresholds_below(scaled: torch.Tensor) -> torch.Tensor:
    """(n,) uint8: how many NF4 thresholds are strictly below each value, the CUDA tree's "x > t -> upper"
    rule; NaN (an all-zero block on CUDA) gives 0.

    On the CPU 15 comparisons added into one uint8 buffer take 0.65x the time of bucketize's binary search
    (torch 2.13, one thread, 3.5M values); a NaN compares False everywhere, so it counts 0 by itself.
    Elsewhere bucketize(right=False), which counts the same but sorts NaN after every threshold.
    """
    if scaled.device.type == "cpu":
        idx = torch.zeros(scaled.shape, dtype=torch.uint8)
        for threshold in NF4_THRESHOLDS.tolist():  # fp32 values, exact as Python floats: an fp32 comparison
            idx += scaled > threshold
        return idx
    idx = torch.bucketize(scaled, NF4_THRESHOLDS.to(scaled.device))
    return torch.where(scaled.isnan(), 0, idx).to(torch.uint8)


def _pack_nibbles(idx: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """(n,) uint8 codes -> ((n + 1) // 2 / itemsize, 1) storage, first element in the high nibble."""
    if idx.numel() % 2:
        # both bitsandbytes paths quantize a 0.0 into the unused low nibble: code 7
        idx = torch.nn.functional.pad(idx, (0, 1), value=7)
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(n/2),) uint8
    if quant_storage != torch.uint8:
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        if packed.numel() % itemsize:
            raise ValueError(f"{packed.numel()} packed bytes do not fill whole {quant_storage} elements")
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``_pack_nibbles``: any storage dtype -> (n,) int64 code indices."""
    data = packed.contiguous().reshape(-1).view(torch.uint8)  # (ceil(n/2),)
    idx = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)  # (2*ceil(n/2),)
    return idx[:n].long()


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    backend: str = "auto",
):
    """Quantize ``weight`` to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does.

    Returns ``(packed, quant_state)``: ``packed`` is ((numel + 1) // 2, 1) uint8 (or that many
    bytes viewed as ``quant_storage``), ``quant_state`` a ``bitsandbytes.functional.QuantState``
    with the same fields bitsandbytes fills, so it can be handed to ``Params4bit`` / PEFT / TRL.
    """
    from bitsandbytes.functional import QuantState

    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"NF4 quantization takes fp32/fp16/bf16 weights, got {weight.dtype}")
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    backend = _resolve_backend(backend, weight.device)

    idx, absmax = _nf4_codes(weight, blocksize, backend)
    packed = _pack_nibbles(idx, quant_storage)
    del idx
    code = NF4_CODE.to(weight.device, copy=True)

    if not compress_statistics:
        state = QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
            code=code, quant_type="nf4",
        )  # fmt: skip
        return packed, state

    offset = absmax.mean()  # 0-d fp32; torch's own mean, as bitsandbytes uses
    nested_code = dynamic_map().to(weight.device)
    rounding = "cpu-lut" if backend == "cpu" else "nearest"
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE, rounding)
    state2 = QuantState(absmax=absmax2, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    state = QuantState(
        absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
        quant_type="nf4", offset=offset, state2=state2,
    )  # fmt: skip
    return packed, state


def block_absmax(quant_state) -> torch.Tensor:
    """The fp32 per-block absmax of a QuantState, undoing double quantization if present: (n_blocks,)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    absmax = dequantize_blockwise_8bit(quant_state.absmax, s2.absmax, s2.code, s2.blocksize)
    return absmax + quant_state.offset.to(absmax.device)  # separate add, as bitsandbytes does


def dequantize_nf4_state(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """NF4 -> ``quant_state.dtype`` tensor of ``quant_state.shape``; equals bitsandbytes' dequantize_4bit.

    The inverse of ``quantize_nf4``, driven by the bitsandbytes ``QuantState`` it returned (hence the
    name: ``velotune.kernels.dequantize_nf4`` is the Triton op over the raw block tensors). Like
    bitsandbytes' kernels it uses the built-in NF4 table, not ``quant_state.code``.
    """
    if quant_state.quant_type != "nf4":
        raise NotImplementedError(f"only nf4 is implemented, got quant_type={quant_state.quant_type!r}")
    shape = torch.Size(quant_state.shape)
    n = shape.numel()
    bs = quant_state.blocksize
    absmax = block_absmax(quant_state).to(packed.device)  # (B,)
    values = NF4_CODE.to(packed.device)[_unpack_nibbles(packed, n)]  # (n,) fp32
    values = torch.nn.functional.pad(values, (0, (-n) % bs)).view(-1, bs)  # (B, bs)
    out = (values * absmax.unsqueeze(1)).reshape(-1)[:n]  # fp32 product, then one cast
    return out.to(quant_state.dtype).reshape(shape)
