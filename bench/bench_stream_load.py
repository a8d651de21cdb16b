"""Loading a sharded bf16 checkpoint in 4-bit / 8-bit / FP8: time, peak GPU memory and peak host memory of
velotune's streaming load, beside the order it replaced (the whole 16-bit model on the GPU, then quantized).

The folder is written first with random weights of a real shape (bench_train.py's SHAPES), shard by shard
(~5 GB each, as the hub's checkpoints are), so writing it never holds the whole model either. Each load runs
in its own process: a clean allocator, and ru_maxrss is that load's host peak.

  PYTHONPATH=src python bench/bench_stream_load.py --shape llama8b --folder /tmp/m8b --quant nf4 --json $OUT/load.json
  PYTHONPATH=src python bench/bench_stream_load.py --dry-run        # tiny shape on the CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES  # noqa: E402

GIB = 2**30


def write_folder(shape: str, folder: Path, shard_gb: float, device: str) -> None:
    """A random bf16 Llama checkpoint of `shape` in `folder`: shards of about `shard_gb`, index, config."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    generator = torch.Generator(device).manual_seed(0)
    written: list[list[str]] = []  # the keys of each shard file, in order
    current, size = {}, 0
    for i, (name, shape_) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            value = torch.ones(shape_, dtype=torch.bfloat16)
        else:
            value = (torch.randn(shape_, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        current[name], size = value, size + value.numel() * 2
        if size >= shard_gb * 1e9 or i == len(shapes) - 1:
            save_file(current, str(folder / f"part-{len(written)}.safetensors"), metadata={"format": "pt"})
            written.append(list(current))
            current, size = {}, 0
    names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for i, name in enumerate(names):  # the count is known only now
        (folder / f"part-{i}.safetensors").rename(folder / name)
    weight_map = {k: name for name, keys in zip(names, written) for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_once(folder: str, quant: str, path: str, device: str) -> dict:
    """One load in this process; the row's figures."""
    import torch

    from velotune.models.from_folder import load_config, load_own, model_class
    from velotune.models.stream_load import quantizer_for
    from velotune.resolve import resolve_source

    source = resolve_source(folder)
    config = load_config(source, False)
    cuda = device == "cuda"
    start = time.perf_counter()
    if path == "stream":
        model = load_own(model_class(config, False), source, config, torch.bfloat16, torch.device(device), quant)
    else:  # the previous order: every layer on the device in 16-bit, then the whole model quantized
        model = load_own(model_class(config, False), source, config, torch.bfloat16, torch.device(device), None)
        quantizer_for(quant, ("lm_head",), torch.bfloat16)(model, "")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"path": path, "quant": quant, "seconds": round(seconds, 1),
           "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
    if cuda:
        row.update(gpu_peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                   gpu_reserved_peak_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                   gpu_loaded_gib=round(torch.cuda.memory_allocated() / GIB, 2))
    del model
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--folder", default="/tmp/velotune_stream_load", help="reused when it holds an index "
                        "already: one folder per shape")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8", "fp8"])
    parser.add_argument("--paths", default="stream,whole", help="stream, whole (the previous order), or both")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one path
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.one:
        print("RESULT " + json.dumps(load_once(args.folder, args.quant, args.one, device)), flush=True)
        return
    if args.dry_run:
        args.shape, args.shard_gb, args.folder = "tiny", 4e-5, args.folder.rstrip("/") + "_tiny"
    start = time.perf_counter()
    write_folder(args.shape, Path(args.folder), args.shard_gb, device)
    print(f"folder {args.folder} ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for path in args.paths.split(","):
        argv_child = [sys.executable, __file__, "--folder", args.folder, "--quant", args.quant, "--one", path]
        done = subprocess.run(argv_child + (["--dry-run"] if args.dry_run else []), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {"path": path, "error": done.stderr.strip().splitlines()[-1:]}
        row["shape"] = args.shape
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
