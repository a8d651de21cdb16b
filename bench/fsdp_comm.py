"""On paper: FSDP2's communication per optimizer step and the bandwidth a multi-node run needs (issue 21 item 3).

For a Llama shape (bench_train.SHAPES) and a mode (full fine-tuning, or LoRA over a frozen base), with
the settings bench/bench_fsdp.py measures (2K tokens x batch 1 per micro-batch, 4 micro-batches per
step, `fully_shard` per decoder layer then the model as root, reshard after forward, bf16 weights
gathered, gradients reduce-scattered once per step in fp32), it computes per GPU and per step:

* bytes moved: each micro-batch all-gathers every unit's bf16 weights twice, the decoder layers' and
  the root's (embeddings, final norm, lm_head): in forward, and again in backward since they were
  resharded after forward (the checkpoint's recomputation runs inside that backward gather). The root
  too: `fsdp.shard` passes reshard_after_forward=True explicitly, and torch keeps the root gathered
  only when that argument is left out (None). The last micro-batch reduce-scatters the trainable
  weights' gradients (LoRA: the adapters only, but the frozen base is gathered all the same).
  A ring collective over W GPUs moves (W - 1) / W of the gathered (or reduced) bytes through each GPU;
* compute: 6 x matmul weights x tokens FLOPs for full fine-tuning, 4 x for LoRA over a frozen base
  (no weight gradient for the base), at a stated model-FLOPs utilisation (MFU) of the GPU's dense bf16
  peak (recomputation, attention's own FLOPs, ~2-3% at 2K, and the adapters' are not counted);
* the inter-node bandwidth per GPU (NCCL's "bus bandwidth": with one NIC per GPU a multi-node ring is
  held back by it) that keeps scaling efficiency >= the target: with the communication hidden under
  compute (overlap, FSDP2's prefetching), step = max(compute, comm), so comm <= compute / target; with
  no overlap at all, step = compute + comm, so comm <= compute x (1 - target) / target;
* HSDP (shard over the 8 GPUs of a node, replicate over nodes; `fully_shard(mesh=2-D)`): only the
  gradients cross nodes, an all-reduce of each GPU's 1/8 shard: 2 (N - 1) / N x its bytes.

  PYTHONPATH=src python bench/fsdp_comm.py                       # the table in docs/decisions.md (8B, 70B; full, LoRA)
  PYTHONPATH=src python bench/fsdp_comm.py --shape llama70b --mode lora --mfu 0.35 --accum 8
These are estimates to check against measured rows: intra-node, NVLink's ~370 GB/s per GPU (NCCL bus
bandwidth on an H200 node) is far above every figure below, so the 1-8 GPU rows of bench_fsdp.py should
scale near-linearly; where they do not, the gap is exposed (un-overlapped) communication or kernel time.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Counts:
    """Weights of one shape, by FSDP2 unit and role (numbers of elements)."""

    layer: int  # one decoder layer: 7 projections + 2 norms
    layers: int  # number of decoder layers
    root: int  # embeddings + final norm + lm_head (the root unit)
    matmul: int  # weights in matrix products per token: the decoder's projections + lm_head (not the embedding lookup)
    lora_per_layer: int  # adapter weights of one layer at rank r (A: r x in, B: out x r for each of the 7 projections)

    @property
    def total(self) -> int:
        return self.layer * self.layers + self.root


def counts(shape: dict, lora_rank: int = 16) -> Counts:
    """Element counts of a Llama shape (hidden d, intermediate f, kv width = kv heads x head size)."""
    d, f, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (d // shape["num_attention_heads"])
    projections = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                   "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # (in, out)
    linear = sum(i * o for i, o in projections.values())
    tied = shape.get("tie_word_embeddings", False)
    head = 0 if tied else vocab * d
    return Counts(layer=linear + 2 * d, layers=shape["num_hidden_layers"], root=vocab * d + d + head,
                  matmul=linear * shape["num_hidden_layers"] + vocab * d,
                  lora_per_layer=sum(lora_rank * (i + o) for i, o in projections.values()))


@dataclass(frozen=True)
class Step:
    """The settings of one optimizer step (bench_fsdp.py's defaults)."""

    mode: str = "full"  # or "lora"
    seq: int = 2048
    batch: int = 1  # per GPU, per micro-batch
    accum: int = 4  # micro-batches per optimizer step
    param_bytes: int = 2  # bf16 weights gathered
    reduce_bytes: int = 4  # fp32 gradient reduction (MixedPrecisionPolicy reduce_dtype)
    reshard_after_forward: bool = True
    lora_rank: int = 16

    @property
    def tokens(self) -> int:
        """Tokens per GPU per optimizer step."""
        return self.seq * self.batch * self.accum


def gathered_bytes(c: Counts, step: Step) -> int:
    """Bytes all-gathered per step (whole tensors, before the (W - 1) / W of a ring)."""
    gathers = 2 if step.reshard_after_forward else 1  # forward, and backward after a reshard
    return step.accum * gathers * c.total * step.param_bytes


def reduced_bytes(c: Counts, step: Step) -> int:
    """Bytes reduce-scattered per step: the trainable weights' gradients, once (the last micro-batch)."""
    trainable = c.total if step.mode == "full" else c.lora_per_layer * c.layers
    return trainable * step.reduce_bytes


def per_gpu_bytes(c: Counts, step: Step, world: int) -> float:
    """Bytes each GPU sends (= receives) per step in ring collectives over `world` GPUs (FSDP over all)."""
    return (world - 1) / world * (gathered_bytes(c, step) + reduced_bytes(c, step))


def hsdp_inter_node_bytes(c: Counts, step: Step, nodes: int, per_node: int = 8) -> float:
    """HSDP: bytes each GPU moves between nodes per step: an all-reduce (2 (N-1)/N) of its gradient shard."""
    return 2 * (nodes - 1) / nodes * reduced_bytes(c, step) / per_node


def compute_seconds(c: Counts, step: Step, mfu: float, peak_tflops: float) -> float:
    """One GPU's compute per step: 6 (full) or 4 (LoRA, frozen base) x matmul weights x tokens, at `mfu`."""
    factor = 6 if step.mode == "full" else 4
    return factor * c.matmul * step.tokens / (mfu * peak_tflops * 1e12)


def needed_bandwidth(volume: float, compute_s: float, target: float, overlap: bool) -> float:
    """Bytes/s per GPU that keep compute / step >= `target` (overlap: step = max; none: step = sum)."""
    budget = compute_s / target if overlap else compute_s * (1 - target) / target
    return volume / budget


def rows(shape_name: str, step: Step, nodes: list[int], per_node: int, mfu: float, peak_tflops: float,
         target: float) -> list[dict]:
    c = counts(SHAPES[shape_name], step.lora_rank)
    compute = compute_seconds(c, step, mfu, peak_tflops)
    out = []
    for n in nodes:
        world = n * per_node
        volume = per_gpu_bytes(c, step, world)
        hsdp = hsdp_inter_node_bytes(c, step, n, per_node)
        out.append(dict(shape=shape_name, mode=step.mode, nodes=n, gpus=world, params_b=c.total / 1e9,
                        compute_s=compute, volume_gb=volume / 1e9,
                        fsdp_overlap_gbs=needed_bandwidth(volume, compute, target, True) / 1e9,
                        fsdp_serial_gbs=needed_bandwidth(volume, compute, target, False) / 1e9,
                        hsdp_volume_gb=hsdp / 1e9, hsdp_overlap_gbs=needed_bandwidth(hsdp, compute, target, True) / 1e9))
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| shape | mode | nodes x 8 | compute s/step | FSDP GB/GPU/step | FSDP GB/s per GPU (overlap / none) "
             "| HSDP inter-node GB/GPU/step | HSDP GB/s per GPU (overlap) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['nodes']} | {r['compute_s']:.2f} | {r['volume_gb']:.1f} | "
                     f"{r['fsdp_overlap_gbs']:.0f} / {r['fsdp_serial_gbs']:.0f} | {r['hsdp_volume_gb']:.3g} | "
                     f"{r['hsdp_overlap_gbs']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama8b,llama70b", help="comma-separated bench_train.SHAPES names")
    parser.add_argument("--mode", default="full,lora", help="full, lora or both")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="per GPU per micro-batch")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False (one gather per micro-batch)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--nodes", default="2,4,8,16")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    parser.add_argument("--target", type=float, default=0.9, help="scaling efficiency to keep")
    args = parser.parse_args(argv)
    nodes = [int(n) for n in args.nodes.split(",")]
    table = []
    for shape in args.shape.split(","):
        if shape not in SHAPES:
            parser.error(f"--shape {shape!r}: one of {sorted(SHAPES)}")
        for mode in args.mode.split(","):
            if mode not in ("full", "lora"):
                parser.error(f"--mode {mode!r}: full or lora")
            step = Step(mode=mode, seq=args.seq, batch=args.batch, accum=args.accum,
                        reduce_bytes=4 if args.reduce_dtype == "fp32" else 2,
                        reshard_after_forward=not args.no_reshard, lora_rank=args.lora_rank)
            table += rows(shape, step, nodes, args.gpus_per_node, args.mfu, args.peak_tflops, args.target)
    text = markdown(table)
    print(text)
    return text


if __name__ == "__main__":
    main()
