"""Continued pretraining the seed's way, small enough for a CPU: LoRA plus trained lm_head/embed_tokens
with their own smaller learning rate (UnslothTrainer / UnslothTrainingArguments), a checkpoint every
few steps, then resuming from the last checkpoint and reloading the adapter for more training.

Run: python examples/continued_pretraining.py [--steps N] [--output DIR]
Press Ctrl-C during training: a checkpoint is saved at the end of the step; run again with --resume.
"""

import argparse

from datasets import Dataset

from velotune import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
from velotune.data.bundled import bundled_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output", default="outputs/continued_pretraining")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    args = parser.parse_args()

    max_seq_length = 128
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=max_seq_length,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth", random_state=3407,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "lm_head", "embed_tokens"],
    )
    # Raw text: continued pretraining reads plain documents, here the bundled answers.
    texts = [row["output"] + tokenizer.eos_token for row in bundled_rows("instructions")]
    dataset = Dataset.from_dict({"text": texts})

    trainer = UnslothTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=max_seq_length, packing=True,
        args=UnslothTrainingArguments(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=args.steps, warmup_steps=1,
            learning_rate=5e-5, embedding_learning_rate=5e-6, logging_steps=1, weight_decay=0.0,
            lr_scheduler_type="cosine", seed=3407, output_dir=args.output, report_to="none",
            save_strategy="steps", save_steps=2,
        ),
    )
    stats = trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"finished at step {trainer.state.global_step}, mean loss {stats.training_loss:.4f}")

    # The seed's "Loading LoRA adapters for continued finetuning": a checkpoint folder loads like a model.
    last = f"{args.output}/checkpoint-{trainer.state.global_step}"
    model, tokenizer = FastLanguageModel.from_pretrained(last, max_seq_length=max_seq_length, load_in_4bit=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"reloaded {last} with {trainable:,} trainable parameters, ready for further training")


if __name__ == "__main__":
    main()
