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
as training does: forward, recomputation and backward; `true` through the same function with the layer
input kept (use_gradient_checkpointing=True since session 12); `torch` through torch's non-reentrant
checkpoint (what True ran before, and still runs where RuntimeSettings.torch_checkpoint asks). `--decode ROWS` counts one no-grad decode
step of the generation engine instead (ROWS token rows, GRPO's group: 8), with the LoRA adapters
read from generation's persistent buffers (fast/stacked_adapters.py) and, beside it, stacked and
cast on every step as before (`stacked_adapters: false`).

    PYTHONPATH=src python bench/count_fused_ops.py [--checkpointing unsloth|true|torch | --decode 8]
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
    mode = {"none": False, "unsloth": "unsloth"}.get(checkpointing, True)
    model = get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=mode).train()
    runtime = model.get_base_model().model.runtime
    if mode == "unsloth":
        runtime.offload_min_tokens, runtime.offload_on_cpu = 0, True
    runtime.torch_checkpoint = checkpointing == "torch"
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


def _decode_counts(layers: int, rows: int, stacked: bool) -> Counter:
    """Op calls of one decode step of `rows` rows on the engine's runner (eager: what a CUDA graph captures)."""
    from velotune.fast.plan import find_decoder, plan_step
    from velotune.inference import engine
    from velotune.inference.cache import StaticKVCache
    from velotune.inference.runner import DecodeGraphs, DecoderRunner

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), r=8, lora_alpha=16,
                           use_gradient_checkpointing=False).eval()
    set_fast_path(model, True)
    engine.STACK_ADAPTERS = stacked
    decoder = find_decoder(model)
    runner = engine._with_adapters(DecoderRunner(model.get_base_model(), decoder, plan_step(decoder, cache=True)),
                                   torch.bfloat16)
    cache = StaticKVCache(runner.kv_shapes(), rows, 32, torch.bfloat16, torch.device("cpu"), False, 0.9)
    graphs = DecodeGraphs(runner, cache, torch.ones(rows, 32, dtype=torch.bool), use_graphs=False)
    with torch.no_grad():
        graphs.run(rows)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            graphs.run(rows)
    return Counter({e.key: e.count for e in prof.key_averages()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpointing", choices=["none", "unsloth", "true", "torch"], default="none")
    parser.add_argument("--decode", type=int, default=0, metavar="ROWS", help="count one decode step of ROWS rows")
    args = parser.parse_args()
    if args.decode:
        for stacked in (True, False):
            one, two = _decode_counts(1, args.decode, stacked), _decode_counts(2, args.decode, stacked)
            per_layer = {op: two[op] - one[op] for op in OPS if two[op] - one[op]}
            print(json.dumps({"decode_rows": args.decode, "stacked_adapters": stacked, "per_layer": per_layer,
                              "kernels_per_layer": sum(per_layer.get(k, 0) for k in KERNELS)}))
        return
    one, two = _counts(1, args.checkpointing), _counts(2, args.checkpointing)
    per_layer = {op: two[op] - one[op] for op in OPS if two[op] - one[op]}
    host = {k: two[k] - one[k] for k in ("python calls", "C calls")}
    print(json.dumps({"per_layer": per_layer, "kernels_per_layer": sum(per_layer.get(k, 0) for k in KERNELS),
                      "host_calls_per_layer": host}))


if __name__ == "__main__":
    main()
