"""bitsandbytes' on-disk NF4 format ("bnb-4bit" checkpoints), per Linear4bit layer X:

  X.weight                                  packed codes, ((n + 1) // 2, 1) uint8
  X.weight.absmax                           fp32 per block, or uint8 when double-quantized
  X.weight.quant_map                        the 16 NF4 codes, fp32
  X.weight.nested_absmax                    fp32 per 256 absmax (double quantization only)
  X.weight.nested_quant_map                 the 256-value dynamic map (double quantization only)
  X.weight.quant_state.bitsandbytes__nf4    JSON bytes (uint8): quant_type, blocksize, dtype,
                                            shape, nested_blocksize, nested_dtype, nested_offset

transformers+bitsandbytes write exactly these keys (``Linear4bit._save_to_state_dict``), so a
folder saved by either side loads in the other. The bias, if any, is an ordinary ``X.bias``
tensor and is not part of this dict.
"""

from __future__ import annotations

import torch


def _normalize(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def linear4bit_state_dict(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The bnb-format tensors of a quantized ``Linear4bit``'s weight, keyed ``{prefix}weight...``.

    ``prefix`` is the module's dotted name, with or without the trailing dot.
    """
    from velotune.quant.nf4_linear import restore_nf4_layout_

    prefix = _normalize(prefix)
    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError(f"{prefix or 'module'}: weight is not quantized (no quant_state)")
    restore_nf4_layout_(module)  # a layer bitsandbytes repacked elsewhere: back to the NF4 layout, in place
    data, state = module.weight.data, module.weight.quant_state
    out = {prefix + "weight": data.detach()}
    for key, value in state.as_dict(packed=True).items():  # bnb's own packing: same JSON bytes
        out[prefix + "weight." + key] = value.detach()
    return out


def load_prequantized(
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
):
    """Build an ``NF4Linear`` (a ``bnb.nn.Linear4bit``) from bnb-format tensors (ours or transformers+bitsandbytes').

    Only the ``{prefix}weight`` and ``{prefix}weight.*`` entries are read; ``bias`` comes from
    the caller (it is an ordinary tensor in the checkpoint). ``compute_dtype=None`` uses the
    dtype the weight was quantized from.
    """
    import bitsandbytes as bnb

    from velotune.quant.nf4_linear import build_nf4_linear

    prefix = _normalize(prefix)
    data = state_dict[prefix + "weight"]
    stats_prefix = prefix + "weight."
    stats = {k[len(stats_prefix) :]: v for k, v in state_dict.items() if k.startswith(stats_prefix)}
    if not stats:
        raise KeyError(f"no quantization statistics under {stats_prefix!r}")
    device = torch.device(device)
    weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device)
    state = weight.quant_state
    if state.quant_type != "nf4":
        raise NotImplementedError(f"{prefix}weight: quant_type {state.quant_type!r}, only nf4 is supported")
    bias = None if bias is None else torch.nn.Parameter(bias.to(device), requires_grad=False)
    return build_nf4_linear(weight, bias, compute_dtype or state.dtype, data.dtype)
