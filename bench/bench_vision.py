"""Vision LoRA / QLoRA training-step benchmark: velotune's FastVisionModel beside Unsloth's (issue 20 item 7).

Qwen2.5-VL-7B or Llama-3.2-11B-Vision shapes with random weights, written once as a checkpoint folder with a
processor (tests/tiny/vision.py's character tokenizer with the family's special tokens, the family's image
processor at the docs' image sizes), then loaded by each stack as users load it: from_pretrained,
get_peft_model (all four switches on, r=16), the stack's vision collator on a batch of image+text rows
(coloured shapes with captions), AdamW. Tokens/s is the median step after warm-up over the batch's
non-padding tokens (image tokens included); peak allocated and reserved GPU memory. Each stack runs in its
own process.

  PYTHONPATH=src:. python bench/bench_vision.py make --shape qwen2_5_vl_7b --out /tmp/v_qwen
  PYTHONPATH=src:. python bench/bench_vision.py run --model /tmp/v_qwen --stack velotune --quant nf4
  PYTHONPATH=src:.:.peers python bench/bench_vision.py run --model /tmp/v_qwen --stack unsloth --quant nf4
  PYTHONPATH=src:. python bench/bench_vision.py run --model /tmp/v_qwen --stack velotune-hf  # transformers' decoder
  PYTHONPATH=src:. python bench/bench_vision.py dry-run      # tiny shape on the CPU, both steps of the above
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import cpu_memory_peak

# Real models' shapes (their config.json), random weights.
SHAPES = {
    "qwen2_5_vl_7b": ("qwen2_5_vl", dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        image_processor=dict(patch_size=14, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}))),
    "llama32_11b_vision": ("mllama", dict(
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                    attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, vision_output_dim=7680,
                    intermediate_layers_indices=[3, 7, 15, 23, 30]),
        image_processor=dict(size={"height": 560, "width": 560}, max_image_tiles=4))),
    "tiny": ("qwen2_vl", None),
}
# Llama-3.2-11B-Vision's vision tower and projector on a tiny text model, 224 px tiles (264 positions a tile instead of
# 1,608): the tower's memory on the CPU (`run --cpu-memory`), where the 11B step's peak sits.
SHAPES["llama32_11b_vision_tower"] = ("mllama", dict(
    text={}, vision={**SHAPES["llama32_11b_vision"][1]["vision"], "image_size": 224},
    image_processor=dict(size={"height": 224, "width": 224}, max_image_tiles=4)))
# Llama-3.2-11B-Vision's layer counts (32 + 8 tower layers, 40 text layers, 8 of them cross-attention) at tiny widths
# and 224 px tiles: the step's host work without most of its arithmetic, counted on the CPU by bench/host_ops.py.
SHAPES["llama32_11b_vision_layers"] = ("mllama", dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=40, num_attention_heads=4,
              num_key_value_heads=2, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38]),
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_global_layers=8, attention_heads=4,
                image_size=224, patch_size=14, max_num_tiles=4, vision_output_dim=384,
                intermediate_layers_indices=[3, 7, 15, 23, 30]),
    image_processor=dict(size={"height": 224, "width": 224}, max_image_tiles=4)))


DERIVED = ("layer_types", "head_dim")  # recomputed from the sizes by the config classes


def resized_config(config, sizes: dict):
    """The tiny config (its token ids) with the real model's text and vision sizes."""
    values = config.to_dict()
    for part in ("text", "vision"):
        old = {k: v for k, v in values[f"{part}_config"].items() if k not in DERIVED}
        values[f"{part}_config"] = {**old, **sizes[part]}
    return type(config)(**values)


def make(shape: str, out: Path) -> None:
    import torch
    import transformers as T

    from tests.tiny import vision as tiny

    family, sizes = SHAPES[shape]
    model, processor = tiny.build(family)
    if sizes is not None:
        config = resized_config(model.config, sizes)
        for key, value in sizes["image_processor"].items():
            for part in (processor.image_processor, getattr(processor, "video_processor", None)):
                if part is not None and hasattr(part, key):
                    setattr(part, key, value)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = T.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    print(f"wrote {shape} ({family}) to {out}")


def rows(count: int, size: int):
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
    out = []
    for i in range(count):
        name = list(colours)[i % 3]
        image = Image.new("RGB", (size, size * 3 // 4), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((size // 8, size // 8, size * 7 // 8, size * 5 // 8), fill=colours[name])
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe accurately what you see in this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"A {name} ellipse on white. " * 4}]}]})
    return out


def run(args) -> dict:
    import torch

    if args.stack == "velotune-hf":  # the previous velotune: transformers' text decoder under the vision model
        from velotune.vision import loading

        loading.own_decoder_class = lambda config: None
    if args.stack == "unsloth":
        import unsloth  # noqa: F401 - first, as Unsloth asks
        from unsloth import FastVisionModel
        from unsloth.trainer import UnslothVisionDataCollator
    else:
        from velotune import FastVisionModel, UnslothVisionDataCollator
    cuda = torch.cuda.is_available()
    if cuda and args.snapshot_load:  # every allocation from here to the "weights" measurement, with its Python stack
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    model, processor = FastVisionModel.from_pretrained(args.model, load_in_4bit=args.quant == "nf4",
                                                       use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=16, lora_dropout=0, bias="none", random_state=3407)
    FastVisionModel.for_training(model)
    if args.offload_min_tokens is not None:
        from velotune.fast.plan import runtime_settings

        runtime_settings(model).offload_min_tokens = args.offload_min_tokens
    if args.cpu_memory:  # the GPU's fused functions and offloading checkpoint, run on the CPU
        from velotune.fast import lora_plain_mlp
        from velotune.fast.plan import runtime_settings, set_fast_path

        if args.chunk_tokens:  # a smaller replay keeps the GPU step's rows per MLP chunk (its chunks' share of memory)
            lora_plain_mlp.CHUNK_TOKENS = args.chunk_tokens

        set_fast_path(model, True)
        runtime_settings(model).offload_on_cpu, runtime_settings(model).offload_min_tokens = True, 0
    if args.profile:
        _mark_vision_tower(model)
    collate = UnslothVisionDataCollator(model, processor)
    batch = collate(rows(args.batch, args.image))
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    phases = {"weights": _gib(torch.cuda.memory_allocated()) if cuda else None}
    if cuda:
        phases["weights_by_kind"] = held_by_kind(model, batch)
        if args.snapshot_load:
            torch.cuda.memory._dump_snapshot(args.snapshot_load)
            torch.cuda.memory._record_memory_history(enabled=None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, warm_peak = [], 0
    for index in range(args.steps):
        if cuda and index == 2:  # CUDA graphs (velotune's text layers) are captured by now: later steps replay them
            warm_peak = max(torch.cuda.max_memory_allocated(), phases.get("_peak", 0))
            phases["_reserved"] = max(phases.get("_reserved", 0), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        profiler = _profiler(cuda) if args.profile and index == args.steps - 1 else contextlib.nullcontext()
        if args.cpu_memory and index == 1:  # the optimizer's state exists, as at the GPU rows' measured step
            profiler = cpu_memory_peak.record()
        measure = cuda and index == 1  # the optimizer's state exists; the timed steps start at 2
        if measure and args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        start = time.perf_counter()
        with profiler as recording:
            with _phase(phases, "forward", measure):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(**batch).loss
            with _phase(phases, "backward", measure):
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if measure and args.snapshot:
            torch.cuda.memory._dump_snapshot(args.snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        if args.profile and index == args.steps - 1:
            _print_profile(profiler, cuda)
        if args.cpu_memory and index == 1:
            print(f"CPU_MEMORY (parameters {next(model.parameters()).dtype}, host copies of offloaded layer inputs "
                  f"left out)\n" + recording.report(top=args.top, exclude=cpu_memory_peak.HOST_COPIES), flush=True)
    step = statistics.median(times[min(2, len(times) - 1):])
    result = {"stack": args.stack, "quant": args.quant, "batch": args.batch, "image": args.image,
              "tokens": tokens, "tokens_per_s": round(tokens / step, 1), "step_s": round(step, 4),
              "loss": round(float(loss.detach()), 4),
              **(_memory(phases, warm_peak) if cuda else {"peak_gib": None}), "phases_gib": phases}
    print("RESULT", json.dumps(result))
    return result


def _memory(phases: dict, warm_peak: int) -> dict:
    """The run's peaks (bench_train.memory_record): `peak_gib` the largest allocation of the run, the figure the
    peers report; `graph_pool_gib` the CUDA graphs' private pool, which replays use without the allocator counting
    it, and `peak_with_graphs_gib` the replayed steps' own peak plus that pool (what the process needs)."""
    import torch

    from bench_train import memory_record

    record = memory_record(max(warm_peak, phases.pop("_peak", 0)), torch.cuda.max_memory_allocated())
    record["reserved_gib"] = round(max(torch.cuda.max_memory_reserved(), phases.pop("_reserved", 0)) / 2**30, 2)
    return record


def _gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 3)


@contextlib.contextmanager
def _phase(phases: dict, name: str, measure: bool):
    """Where the peak comes from: allocated memory before a phase, its own peak, and what it leaves held
    (forward: the tensors saved for backward). The peak counters are reset here; the peaks before each reset
    are kept in `phases` ("_peak", "_reserved") so the run's overall peaks stay the ones reported."""
    import torch

    if not measure:
        yield
        return
    for key, value in (("_peak", torch.cuda.max_memory_allocated()), ("_reserved", torch.cuda.max_memory_reserved())):
        phases[key] = max(phases.get(key, 0), value)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    peak = torch.cuda.max_memory_allocated()
    phases[name] = {"before": _gib(before), "peak": _gib(peak), "after": _gib(torch.cuda.memory_allocated())}


def held_by_kind(model, batch: dict) -> dict:
    """GiB of what is allocated after loading, by kind: frozen and trainable parameters by dtype, buffers, the
    batch, and the rest (cuBLAS workspaces, caches a stack keeps), each storage counted once. Session 14 found
    velotune 37 MiB above Unsloth here on Qwen2.5-VL-7B and could not say where from."""
    import torch

    seen: set[int] = set()
    kinds: dict[str, int] = {}

    def count(kind: str, tensor) -> None:
        if not torch.is_tensor(tensor) or not tensor.is_cuda:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        kinds[kind] = kinds.get(kind, 0) + storage.nbytes()

    for p in model.parameters():
        count(f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).removeprefix('torch.')}", p)
        state = getattr(p, "quant_state", None)  # bitsandbytes' NF4 statistics live beside the weight
        if state is not None:
            for t in (state.absmax, getattr(state, "code", None), *((state.state2.absmax, state.state2.code)
                                                                    if getattr(state, "nested", False) else ())):
                count("nf4 statistics", t)
    for b in model.buffers():
        count("buffers", b)
    for v in batch.values():
        count("batch", v)
    before = torch.cuda.memory_allocated()
    torch._C._cuda_clearCublasWorkspaces()  # they come back at the next GEMM
    other = torch.cuda.memory_allocated() - sum(kinds.values())
    kinds["cublas workspaces"] = before - torch.cuda.memory_allocated()
    kinds["other (caches a stack keeps)"] = other
    result = {k: round(v / 2**30, 4) for k, v in sorted(kinds.items())}
    if other > 2**20:  # name the largest CUDA tensors Python holds outside the model and batch
        import gc

        found = []
        for obj in gc.get_objects():
            if torch.is_tensor(obj) and obj.is_cuda and obj.untyped_storage().data_ptr() not in seen:
                holders = [type(r).__name__ for r in gc.get_referrers(obj)[:3]]
                found.append((obj.untyped_storage().nbytes(), f"{tuple(obj.shape)} {obj.dtype} held by {holders}"))
        result["other tensors"] = [f"{n / 2**20:.1f} MiB {what}" for n, what in sorted(found, reverse=True)[:6]]
    return result


def _profiler(cuda: bool):
    """torch.profiler over one step, with the vision tower's forward marked (`vision_tower` in the table), so
    the step splits into the tower and the rest (language model, loss, optimizer)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities)


def _mark_vision_tower(model) -> None:
    """Wrap the vision tower's forward in a record_function range (a profile can then attribute its time)."""
    import torch

    tower = next((m for name, m in model.named_modules() if name.endswith(("visual", "vision_tower", "vision_model"))),
                 None)
    if tower is None:
        return
    forward = tower.forward

    def marked(*args, **kwargs):
        with torch.profiler.record_function("vision_tower"):
            return forward(*args, **kwargs)

    tower.forward = marked


def _print_profile(profiler, cuda: bool) -> None:
    table = profiler.key_averages()
    for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(f"PROFILE last step by {key}\n" + table.table(sort_by=key, row_limit=30), flush=True)
    tower = [e for e in table if e.key == "vision_tower"]
    if tower:
        e = tower[0]
        print("PROFILE vision_tower forward: cpu %.1f ms, device %.1f ms" % (
            e.cpu_time_total / 1e3, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("make", "run", "dry-run"))
    parser.add_argument("--shape", default="qwen2_5_vl_7b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--stack", default="velotune", choices=("velotune", "velotune-hf", "unsloth"),
                        help="velotune-hf: velotune with transformers' text decoder (no own decoder), for comparison")
    parser.add_argument("--quant", default="nf4", choices=("nf4", "none"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=512, help="image width in px (the docs advise 300-1000)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the last step, with the "
                        "vision tower's forward time")
    parser.add_argument("--offload-min-tokens", type=int, help="velotune: offload checkpointed layer inputs from "
                        "this many tokens a micro-batch (RuntimeSettings.offload_min_tokens; default 1024)")
    parser.add_argument("--cpu-memory", action="store_true", help="on the CPU: run the fast path there and print what "
                        "is alive at step 2's peak by allocation site (bench/cpu_memory_peak.py)")
    parser.add_argument("--top", type=int, default=16, help="--cpu-memory: allocation sites listed")
    parser.add_argument("--chunk-tokens", type=int, help="--cpu-memory: token rows per chunk of the towers' MLP "
                        "(fast/lora_plain_mlp.py's CHUNK_TOKENS, 2048: 168 gives the 224 px tower shape at batch 1 "
                        "the 11B GPU rows' chunks per layer)")
    parser.add_argument("--snapshot-load", help="write torch.cuda.memory's snapshot of loading here (pickle; "
                        "bench/snapshot_peak.py's `end` lists what loading left allocated, by allocation site)")
    parser.add_argument("--snapshot", help="write torch.cuda.memory's snapshot of step 2 here (pickle; "
                        "https://pytorch.org/memory_viz reads it)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.shape, args.out)
    elif args.command == "run":
        run(args)
    else:
        import tempfile

        folder = Path(tempfile.mkdtemp()) / "tiny"
        make("tiny", folder)
        args.model, args.steps, args.image, args.quant = str(folder), 2, 64, "none"
        run(args)


if __name__ == "__main__":
    sys.exit(main())
