"""DPO training-step benchmark: velotune against transformers+PEFT and Unsloth, all through TRL's DPOTrainer.

The same random-weight Llama folder (Llama-3.1-8B shape by default, bf16 or NF4), the same random-token
preference rows (prompt + chosen/rejected of fixed lengths), LoRA r=32 on every projection, the same
DPOConfig; each stack runs in its own process (peers patch transformers globally) and prints one
`RESULT {json}` line: median optimizer-step time after warm-up, pairs/s, peak GPU memory (allocated and
reserved; loading's memory included, as a user's run has it).

  velotune  velotune.DPOTrainer (TRL's subclass): reference = the adapter-disabled model, our fast path.
  hf        transformers' Llama + PEFT + gradient checkpointing, TRL's DPOTrainer (TRL copies the
            adapter into a frozen "ref" adapter for the reference pass).
  unsloth   Unsloth's FastLanguageModel + PatchDPOTrainer(), TRL's DPOTrainer (the docs' cell).

On the GPU machine (no network; TRL, datasets and Unsloth come from the peers' site folder, built by
../shared/bench/make_peer_site.sh into .peers and carried):
  export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
  python bench/bench_dpo.py make --out /tmp/m_llama8b --shape llama8b
  for s in velotune hf unsloth; do python bench/bench_dpo.py run --model /tmp/m_llama8b --stack $s; done
On the CPU (a check that the script runs, no figures):
  PYTHONPATH=src python bench/bench_dpo.py dry-run
`--method orpo` runs ORPO instead (TRL's experimental ORPOTrainer; velotune's computes its log-probs with the
chunked kernel, TRL's and Unsloth's build the (2 x bs, T, V) logits), reference-free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = 32000  # the word-level tokenizer's size: "w4" .. "w31999" are one token each


def make(args) -> None:
    """A random Llama of the shape, saved in bf16, with a word-level tokenizer (one token per "wN")."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **SHAPES[args.shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(args.out)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, min(config.vocab_size, WORDS))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(args.out)
    print(f"made {args.shape} at {args.out}", flush=True)


def rows(count: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random preference rows: `prompt` words, then chosen/rejected answers of `completion` words each
    (one token per word, EOS appended by TRL)."""
    import random

    rng = random.Random(seed)
    top = min(vocab, WORDS)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(4, top)}" for _ in range(n))

    return [{"prompt": text(prompt), "chosen": " " + text(completion - 1),
             "rejected": " " + text(completion - 1)} for _ in range(count)]


def load(args, dtype):
    """(model, tokenizer, trainer class, config class) of the stack."""
    if args.stack == "velotune":
        import velotune

        model, tokenizer = velotune.FastLanguageModel.from_pretrained(
            args.model, max_seq_length=args.prompt + args.completion, dtype=dtype,
            load_in_4bit=args.quant == "nf4", device_map=args.device)
        model = velotune.FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none", target_modules=TARGETS,
            use_gradient_checkpointing="unsloth", random_state=3407)
        if args.method == "orpo":
            return model, tokenizer, velotune.ORPOTrainer, velotune.ORPOConfig
        return model, tokenizer, velotune.DPOTrainer, velotune.DPOConfig
    if args.stack == "unsloth":
        from unsloth import FastLanguageModel, PatchDPOTrainer

        PatchDPOTrainer()
        from trl import DPOConfig, DPOTrainer
        if args.method == "orpo":
            DPOConfig, DPOTrainer = orpo_classes()

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=args.model, max_seq_length=args.prompt + args.completion, dtype=dtype,
            load_in_4bit=args.quant == "nf4")
        model = FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, bias="none", target_modules=TARGETS,
            use_gradient_checkpointing="unsloth", random_state=3407)
        return model, tokenizer, DPOTrainer, DPOConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    kwargs = dict(dtype=dtype, attn_implementation="sdpa", device_map={"": args.device})
    if args.quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if args.method == "orpo":
        DPOConfig, DPOTrainer = orpo_classes()
    return model, AutoTokenizer.from_pretrained(args.model), DPOTrainer, DPOConfig


def orpo_classes():
    """(ORPOConfig, ORPOTrainer) of TRL: trl.experimental in TRL 1.x, trl before."""
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:
        from trl import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def run(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, tokenizer, trainer_cls, config_cls = load(args, dtype)
    load_s = time.perf_counter() - start
    load_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (the device synchronized at both ends)."""

        def __init__(self):
            self.times, self.begin = [], None

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.begin)

    steps = args.warmup + args.steps
    data = Dataset.from_list(rows(args.bs * args.ga * steps, args.prompt, args.completion,
                                  model.config.vocab_size))
    method = {"precompute_ref_log_probs": args.precompute} if args.method == "dpo" else {}
    config = config_cls(
        output_dir=tempfile.mkdtemp(prefix="bench_dpo_"), per_device_train_batch_size=args.bs,
        gradient_accumulation_steps=args.ga, max_steps=steps, learning_rate=5e-6, beta=0.1,
        max_length=args.prompt + args.completion + 1, bf16=cuda, fp16=False, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, **method,
        # hf checkpoints through transformers; velotune and Unsloth checkpoint in get_peft_model ("unsloth")
        gradient_checkpointing=args.stack == "hf", dataset_num_proc=None)
    timer = StepTimer()
    reference = {"ref_model": None} if args.method == "dpo" else {}
    trainer = trainer_cls(model=model, **reference, args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=[timer])
    adapters = list(getattr(model, "peft_config", {}))
    trainer.train()
    measured = timer.times[args.warmup:]
    step_s = statistics.median(measured)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    gib = 2**30
    return dict(
        stack=args.stack, method=args.method, quant=args.quant, shape=args.model, prompt=args.prompt, completion=args.completion,
        bs=args.bs, ga=args.ga, rank=args.rank, precompute_ref_log_probs=args.precompute, adapters=adapters,
        step_s=round(step_s, 4), pairs_per_s=round(args.bs * args.ga / step_s, 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
        reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2) if cuda else None,
        load_gib=round(load_gib, 2), load_s=round(load_s, 1), loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4), device=torch.cuda.get_device_name() if cuda else "cpu")


def dry_run() -> None:
    """The tiny shape on the CPU, velotune and transformers+PEFT, one measured step each (Unsloth needs a GPU)."""
    folder = tempfile.mkdtemp(prefix="bench_dpo_tiny_")
    subprocess.run([sys.executable, __file__, "make", "--out", folder, "--shape", "tiny"], check=True)
    for stack, method in (("velotune", "dpo"), ("hf", "dpo"), ("velotune", "orpo")):
        subprocess.run([sys.executable, __file__, "run", "--model", folder, "--stack", stack, "--device", "cpu",
                        "--prompt", "16", "--completion", "8", "--bs", "2", "--ga", "1", "--steps", "1",
                        "--warmup", "1", "--rank", "8", "--method", method], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cmd", choices=["make", "run", "dry-run"])
    parser.add_argument("--out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--model", help="a folder written by `make`")
    parser.add_argument("--stack", choices=["velotune", "hf", "unsloth"], default="velotune")
    parser.add_argument("--quant", choices=["none", "nf4"], default="none")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=512, help="tokens of each answer (EOS included)")
    parser.add_argument("--bs", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--ga", type=int, default=4, help="gradient accumulation steps")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True (DPO)")
    parser.add_argument("--method", choices=["dpo", "orpo"], default="dpo")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cmd == "make":
        make(args)
    elif args.cmd == "dry-run":
        dry_run()
    else:
        print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
