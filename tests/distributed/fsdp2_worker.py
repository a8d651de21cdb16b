"""FSDP2 on velotune's decoder: `fully_shard` on each decoder layer and on the whole model (LoRA, the
offloading checkpoint), three AdamW steps; the same script runs unsharded as one plain process.

Started by tests/distributed/test_fsdp2.py; writes `fsdp2-<rank>.json` (mean loss over ranks per step,
the adapter's weights gathered whole after the last step, and the step plan's fast / per_layer /
checkpoint) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from velotune import FastLanguageModel
from velotune.fast.plan import find_decoder, plan_step, runtime_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fast", action="store_true", help="force the fast path on the CPU")
    options = parser.parse_args()
    run(options.folder, options.out, options.fast)


def run(folder: str, out: str, fast: bool, keep_group: bool = False) -> None:
    """The whole job; fsdp_trainer_worker.py calls it first in its own processes (--fsdp2-out), which saves the
    CI two launches. Under torchrun it makes its own process group and destroys it, unless keep_group (the
    trainers that follow take the group that is there: a second rendezvous on torchrun's store hangs)."""
    torch.set_num_threads(1)
    options = argparse.Namespace(folder=folder, out=out, fast=fast)
    model, _ = FastLanguageModel.from_pretrained(options.folder, load_in_4bit=False, device_map="cpu", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                             use_gradient_checkpointing="unsloth")
    settings = runtime_settings(model)
    settings.fast_path, settings.offload_on_cpu, settings.offload_min_tokens = options.fast, True, 0
    ids = torch.randint(4, 90, (4, 24), generator=torch.Generator().manual_seed(0))  # (global batch 4, T 24)
    sharded = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if sharded:
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for layer in find_decoder(model).layers:
            fully_shard(layer)  # parameters, gradients and optimizer state sharded per decoder layer
        fully_shard(model)
    batch = ids.chunk(world)[rank]  # (4 / world, 24)
    model.train()
    plan = plan_step(model, training=True, grad=True, labels=True, tokens=batch.numel())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if sharded:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    adapter = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
            adapter[name] = value.flatten()[:16].tolist()
    if rank == 0:
        Path(options.out).mkdir(parents=True, exist_ok=True)
        result = {"losses": losses, "adapter": adapter, "fast": plan.fast, "per_layer": plan.per_layer,
                  "checkpoint": plan.checkpoint}
        (Path(options.out) / f"fsdp2-{world}.json").write_text(json.dumps(result))
    if sharded and not keep_group:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
