"""GRPO step time, where it goes, and peak memory: velotune's GRPOTrainer on a random-weight Llama.

The settings are the shared peer harness's (`../shared/bench/grpo_bench.py`, which runs TRL's GRPOTrainer and
Unsloth's on the same folder, so the rows compare): LoRA r=32, alpha 32, dropout 0 on all 7 projections,
`use_gradient_checkpointing="unsloth"`, bf16, 1 prompt of 64 words x 8 generations per step, reward =
completion length / 1000, lr 1e-5, beta 0 (TRL's default), loss dapo. A random model almost never emits EOS,
so every completion runs to max_completion_length: the step does the work the setting names.

Each run prints one `RESULT {json}` line: median step seconds after the first step (it holds graph
captures and kernel compiles), completion tokens/s, and where the step went, measured with the device
synchronized around each part:
  generate_s    sampling on velotune's engine (prefill shared by a group, decode to the completion length)
  logps_s       extra no-grad log-prob passes (old policy for num_iterations > 1; reference when beta > 0)
  train_s       the rest: the policy's forward + backward with chunked log-probs, the optimizer step
peak_gib is torch's max allocated (what the peers' harness reports); graph_pool_gib the CUDA graphs' private pool
(decode and training layers), which replays use without the allocator counting it, and peak_with_graphs_gib the
steps after the first at their peak plus that pool (bench_train.memory_record); reserved_gib beside them.

  python bench/bench_grpo.py --model /tmp/m_llama1b [--gens 8 --completion 512 --prompt-words 64 --quant nf4]
  python bench/bench_grpo.py --dry-run          # a tiny random Llama on the CPU, 2 steps: the script runs
Models: `python .bench/peer_bench.py make --out /tmp/m_llama1b --preset llama1b` (or bench_dpo.py make).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(count: int, words: int) -> list[dict]:
    """The peer harness's prompts: `words` word-level tokens ("wN") each, different per row."""
    return [{"prompt": " ".join(f"w{(i * 37 + j * 11) % 30000 + 4}" for j in range(words))} for i in range(count)]


def reward_len(completions, **kwargs):
    return [float(len(c)) / 1000 for c in completions]


def run(args) -> dict:
    import torch
    from bench_train import memory_record  # bench/ is on the path (main)
    from datasets import Dataset
    from transformers import TrainerCallback

    import velotune
    from velotune.inference import engine as engine_module
    from velotune.inference.engine import resident_of
    from velotune.rl.generation import Sampler
    from velotune.rl.trainer import GRPOTrainer

    cuda = torch.cuda.is_available() and not args.cpu
    engine_module.STACK_ADAPTERS = not args.no_stacked_adapters

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Parts:
        """Seconds spent per part in the current step (the device synchronized at each boundary)."""

        def __init__(self):
            self.current = {"generate_s": 0.0, "logps_s": 0.0}
            self.steps = []

        def timed(self, key, function):
            def wrapper(*a, **k):
                sync()
                start = time.perf_counter()
                try:
                    return function(*a, **k)
                finally:
                    sync()
                    self.current[key] += time.perf_counter() - start
            return wrapper

    parts = Parts()
    engine = []  # the engine's resident cache + graphs after each generation (None: not kept)
    graph_sets = []  # one entry per new graph set kept after a generation (1: captured once and reused); a
    # generation whose cache was released (cache_released) captured its graphs anew and is not counted here

    class TimedGRPOTrainer(GRPOTrainer):
        """velotune's trainer with its sampling and no-grad log-prob passes timed (nothing else changed)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if args.keep_cache_fraction is not None:
                self._sampler = Sampler(keep_cache_fraction=args.keep_cache_fraction)
            self.untimed_sampler = self._sampler
            timed = parts.timed("generate_s", self._sampler)

            def sample_and_look(model, *rest):
                out = timed(model, *rest)
                kept = resident_of(model)
                engine.append(kept)
                if kept is not None and not getattr(kept.graphs, "seen_by_bench", False):
                    kept.graphs.seen_by_bench = True  # a graph set not seen before: captured for this generation
                    graph_sets.append(1)
                return out
            self._sampler = sample_and_look

        def _logps_no_grad(self, model, batch):
            return parts.timed("logps_s", super()._logps_no_grad)(model, batch)

    class StepTimer(TrainerCallback):
        """Times each step; with --profile, runs torch.profiler over step 2 (after the warm-up) and prints
        its top CUDA kernels and CPU ops (cudaGraphLaunch there = decode on CUDA graphs)."""

        profiler = None

        def on_step_begin(self, args_, state, *_, **__):
            sync()
            if cuda and state.global_step == 1:  # step 1 captured the graphs: later steps replay them
                parts.warm_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if args.profile and state.global_step == 1:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                self.profiler.__enter__()
            parts.current = {"generate_s": 0.0, "logps_s": 0.0, "begin": time.perf_counter()}

        def on_step_end(self, *_, **__):
            sync()
            step = time.perf_counter() - parts.current.pop("begin")
            parts.steps.append({**parts.current, "step_s": step,
                                "train_s": step - parts.current["generate_s"] - parts.current["logps_s"]})
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages()
                for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
                    print(f"PROFILE step 2 by {key}\n" + table.table(sort_by=key, row_limit=25), flush=True)
                self.profiler = None

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=args.max_seq_length or args.prompt_words + 8 + args.completion,
        dtype=dtype,
        load_in_4bit=args.quant == "nf4", device_map="cuda" if cuda else "cpu")
    model = velotune.FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing="unsloth", random_state=3407)
    load_s = time.perf_counter() - start
    batch = args.gens * args.prompts
    config = velotune.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_"), per_device_train_batch_size=batch,
        num_generations=args.gens, max_completion_length=args.completion, max_prompt_length=None,
        gradient_accumulation_steps=1, num_iterations=args.num_iterations, beta=args.beta, learning_rate=1e-5,
        max_steps=args.steps, logging_steps=1, report_to="none", bf16=cuda, fp16=False, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = TimedGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward_len], args=config,
                               train_dataset=Dataset.from_list(prompts(64, args.prompt_words)),
                               callbacks=[StepTimer()])
    trainer.train()
    # step 1 holds the graph captures and compiles; a profiled step 2 carries the profiler's overhead
    measured = [s for i, s in enumerate(parts.steps) if i > 0 and not (args.profile and i == 1)] or parts.steps
    median = {key: statistics.median(s[key] for s in measured) for key in ("step_s", "generate_s", "logps_s",
                                                                             "train_s")}
    gib = 2 ** 30
    tokens = batch * args.completion
    return dict(
        stack="velotune", bench="grpo", model=args.model, quant=args.quant, gens=args.gens, prompts=args.prompts,
        prompt_words=args.prompt_words, completion=args.completion, beta=args.beta,
        num_iterations=args.num_iterations, rank=args.rank, stacked_adapters=engine_module.STACK_ADAPTERS,
        **{k: round(v, 3) for k, v in median.items()},
        completion_tokens_per_s=round(tokens / median["step_s"], 1),
        **(memory_record(getattr(parts, "warm_peak", 0), torch.cuda.max_memory_allocated()) if cuda
           else {"peak_gib": None}),
        engine=trainer.untimed_sampler.last_engine,
        # how many distinct graph sets the engine used over the run (1 = captured once, reused every step)
        cache_released=trainer.untimed_sampler.released,
        graph_sets=len(graph_sets),
        decode_graphs=engine[-1].graphs.use_graphs if engine and engine[-1] is not None else None,
        kv_cache_gib=round(engine[-1].cache.nbytes / gib, 3) if engine and engine[-1] is not None else None,
        load_s=round(load_s, 1), steps=[round(s["step_s"], 2) for s in parts.steps],
        device=torch.cuda.get_device_name() if cuda else "cpu")


def dry_run(argv_rest: list[str]) -> dict:
    """A tiny random Llama (bench_dpo.py's `make`) on the CPU, 2 steps of 4 generations x 8 tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_dpo import make

    folder = tempfile.mkdtemp(prefix="bench_grpo_tiny_")
    make(argparse.Namespace(out=folder, shape="tiny"))
    args = parse(["--model", folder, "--cpu", "--gens", "4", "--completion", "8", "--prompt-words", "8",
                  "--steps", "2", "--rank", "8", *argv_rest])
    return run(args)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a folder from peer_bench.py make / bench_dpo.py make")
    parser.add_argument("--dry-run", action="store_true", help="tiny random Llama on the CPU, 2 steps")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--gens", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--prompt-words", type=int, default=64, help="prompt length in (one-token) words")
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--quant", choices=["none", "nf4"], default="none")
    parser.add_argument("--beta", type=float, default=0.0, help="> 0 adds the reference (adapter-disabled) pass")
    parser.add_argument("--num-iterations", type=int, default=1, help="> 1 adds the old-policy pass")
    parser.add_argument("--max-seq-length", type=int, default=None, help="from_pretrained's (default: prompt + "
                        "completion + 8)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of step 2")
    parser.add_argument("--no-stacked-adapters", action="store_true", help="decode steps stack and cast the LoRA "
                        "adapters on every step, as before fast/stacked_adapters.py (for comparison)")
    parser.add_argument("--keep-cache-fraction", type=float, default=None, help="the engine's KV cache is kept "
                        "between steps below this share of the weight bytes (default: the trainer's; 0: release "
                        "every step; inf: keep)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        rest = [a for a in argv if a != "--dry-run"]
        result = dry_run(rest)
    else:
        args = parse(argv)
        if not args.model:
            raise SystemExit("--model FOLDER is required (or --dry-run)")
        result = run(args)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
