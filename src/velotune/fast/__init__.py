"""The GPU fast path's runtime: the plan (dispatch), fused LoRA linear/MLP autograd functions,
the kernel ops they call, offloaded checkpointing and the layers' CUDA graphs.

Layering (tests/test_layering.py): this package imports `kernels/`, `quant/` and the bottom
layer only, never `models/` or `lora/`, which call into it. Nothing is imported here, so
importing one module of the package does not pull in the others.
"""
