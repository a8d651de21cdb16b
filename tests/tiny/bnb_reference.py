"""bitsandbytes' NF4 dequantization as its portable implementation computes it, on every CPU.

On a CPU whose PyTorch reports AVX512, bitsandbytes 0.50 registers native CPU kernels for
`dequantize_4bit` that read each row's blocks from the row's start (`A.reshape(m, n // 2)`), while its
`quantize_4bit` makes flat blocks: for a weight whose blocks straddle rows (in_features not a multiple
of the blocksize) they scale values with another block's absmax. On other CPUs bitsandbytes runs its
default (PyTorch) implementation. Tests that check our NF4 math "bit for bit against bitsandbytes"
compare with that implementation, so they check the same thing on every processor; on a GPU they
compare with bitsandbytes' CUDA path as before.
"""

from __future__ import annotations

import torch


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """`bitsandbytes.functional.dequantize_4bit(packed, state)`, through bitsandbytes' portable kernel on the CPU."""
    import bitsandbytes.functional as bnbF

    if packed.device.type != "cpu":
        return bnbF.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:  # as bnbF.dequantize_4bit: the 8-bit block scales first, plus their offset, in fp32
        absmax = (bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    flat = packed.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(flat, absmax, _get_4bit_code(state.quant_type, flat.device), state.blocksize,
                                    state.shape, state.dtype)
