"""The host work of a vision training step, counted on the CPU: aten calls per phase and per checkpointed layer.

Why: a step whose GPU work is small next to its launches is bound by the host (BENCHMARKS.md, session 20: the
Llama-3.2-11B-Vision QLoRA step took 1.10 s for 0.45 s of GPU time). Counting the aten calls of a step with the
real model's layer counts at tiny widths (`bench_vision.py make --shape llama32_11b_vision_layers`) shows where
they come from without a GPU: the fast path is forced on the CPU (its fused functions and offloading checkpoint run
as on CUDA; Triton kernels run their PyTorch references, so a few more calls than there).

  PYTHONPATH=src:.:tests:bench python bench/bench_vision.py make --shape llama32_11b_vision_layers --out /tmp/v_layers
  PYTHONPATH=src:.:tests:bench python bench/host_ops.py /tmp/v_layers
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

import bench_vision


def _aten_calls(event) -> int:
    return int(event.name.startswith("aten::")) + sum(_aten_calls(c) for c in event.cpu_children)


def _checkpoints(event, found: list) -> list:
    """The checkpointed layers' backward nodes under `event`, in the order autograd ran them."""
    for child in event.cpu_children:
        if child.name.endswith("_CheckpointFunctionBackward"):
            found.append(child)
        else:
            _checkpoints(child, found)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a folder from bench_vision.py make")
    args = parser.parse_args()
    from velotune import FastVisionModel, UnslothVisionDataCollator
    from velotune.fast.plan import runtime_settings, set_fast_path

    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(args.model, load_in_4bit=False,
                                                       use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, random_state=3407)
    FastVisionModel.for_training(model)
    set_fast_path(model, True)
    settings = runtime_settings(model)
    settings.offload_on_cpu, settings.offload_min_tokens = True, 0
    batch = UnslothVisionDataCollator(model, processor)(bench_vision.rows(2, 512))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True)

    def step():
        with torch.profiler.record_function("FORWARD"):
            loss = model(**batch).loss
        with torch.profiler.record_function("BACKWARD"):
            loss.backward()
        with torch.profiler.record_function("OPTIMIZER"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here, as in a measured step
    with torch.profiler.profile() as profiler:
        step()
    phases = {e.name: e for e in profiler.events() if e.name in ("FORWARD", "BACKWARD", "OPTIMIZER")}
    layers = _checkpoints(phases["BACKWARD"], [])
    per_layer = collections.Counter(_aten_calls(e) for e in layers)  # aten calls -> how many layers made that many
    print("RESULT " + json.dumps({
        "aten_calls": {name: _aten_calls(e) for name, e in phases.items()},
        "checkpointed_layers": len(layers),
        "aten_calls_per_layer_backward": {str(k): v for k, v in sorted(per_layer.items())},
    }))


if __name__ == "__main__":
    main()
