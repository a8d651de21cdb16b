"""Operator calls and Python calls per decoder layer of one fused-path training step.

Why: on the GPU the fast path's step was CPU-bound (thousands of small casts and matmuls per
optimizer step, see docs/decisions.md "Fast path"); every aten call is at least one kernel
launch on CUDA. Counting them needs no GPU: this builds a tiny bf16 llama with PEFT's fp32 LoRA
adapters on q/k/v/o/gate/up/down, forces the fast path on the CPU, profiles one forward +
backward with torch.profiler and prints the calls of the ops that matter, per layer (the
difference between a 2-layer and a 1-layer model, so the embedding/loss are not counted).
It also counts the Python function calls and the calls into C (torch ops, builtins) of one
step per layer (`sys.setprofile`): the host's share of a launch-bound step that is not a kernel.
`--checkpointing unsloth` runs the step through the offloading checkpoint (its CPU stand-in),
as training does: forward, recomputation and backward.

    PYTHONPATH=src python bench/count_fused_ops.py [--checkpointing unsloth]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig

from velotune.fast.plan import set_fast_path
from velotune.lora import get_peft_model
from velotune.models.families import LlamaForCausalLM

OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::to", "aten::_to_copy", "aten::copy_",
       "aten::cat", "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::contiguous", "aten::clone")
# What reaches a device as a kernel: the leaf compute ops (matmul/to/contiguous are wrappers).
KERNELS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::_to_copy", "aten::cat", "aten::mul", "aten::mul_",
           "aten::add", "aten::add_", "aten::clone")


def _counts(layers: int, checkpointing: str) -> Counter:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    mode = "unsloth" if checkpointing == "unsloth" else False
    model = get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=mode).train()
    if mode:
        runtime = model.get_base_model().model.runtime
        runtime.offload_min_tokens, runtime.offload_on_cpu = 0, True
    set_fast_path(model, True)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = Counter({e.key: e.count for e in prof.key_averages()})
    calls = Counter()

    def count(frame, event, arg):
        calls[event] += 1

    sys.setprofile(count)
    model(input_ids=ids, labels=ids).loss.backward()
    sys.setprofile(None)
    counts["python calls"], counts["C calls"] = calls["call"], calls["c_call"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpointing", choices=["none", "unsloth"], default="none")
    args = parser.parse_args()
    one, two = _counts(1, args.checkpointing), _counts(2, args.checkpointing)
    per_layer = {op: two[op] - one[op] for op in OPS if two[op] - one[op]}
    host = {k: two[k] - one[k] for k in ("python calls", "C calls")}
    print(json.dumps({"per_layer": per_layer, "kernels_per_layer": sum(per_layer.get(k, 0) for k in KERNELS),
                      "host_calls_per_layer": host}))


if __name__ == "__main__":
    main()
