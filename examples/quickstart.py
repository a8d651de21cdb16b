"""Quickstart: the seed's notebook flow on the bundled defaults, small enough for a CPU.

Loads SmolLM2-135M-Instruct (the bundled fixture when the hub is unreachable), attaches LoRA,
trains a few steps with TRL's SFTTrainer on velotune's bundled instruction data, then answers
a question. Run: python examples/quickstart.py [--steps N] [--output DIR]
"""

import argparse

from trl import SFTConfig, SFTTrainer

from velotune import FastLanguageModel, is_bfloat16_supported
from velotune.data.bundled import load_bundled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="outputs/quickstart")
    args = parser.parse_args()

    max_seq_length = 256
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=max_seq_length, dtype=None, load_in_4bit=False,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
    )

    def to_text(row):
        messages = [{"role": "user", "content": f"{row['instruction']}\n{row['input']}".strip()},
                    {"role": "assistant", "content": row["output"]}]
        return {"text": tokenizer.apply_chat_template(messages, tokenize=False)}

    dataset = load_bundled("instructions").map(to_text)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text", max_length=max_seq_length, per_device_train_batch_size=4,
            gradient_accumulation_steps=1, warmup_steps=2, max_steps=args.steps, learning_rate=2e-4,
            logging_steps=1, optim="adamw_torch", weight_decay=0.01, lr_scheduler_type="linear",
            seed=3407, output_dir=args.output, report_to="none", save_strategy="no",
            bf16=False, fp16=False, use_cpu=not is_bfloat16_supported() or None,
        ),
    )
    stats = trainer.train()
    print(f"trained {args.steps} steps, final loss {stats.training_loss:.4f}")

    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    model.save_pretrained(f"{args.output}/lora_model")
    tokenizer.save_pretrained(f"{args.output}/lora_model")
    print(f"adapter saved to {args.output}/lora_model")


if __name__ == "__main__":
    main()
