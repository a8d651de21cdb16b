"""The docs' training snippets: the Llama-3 tutorial's settings and parameters, checkpoints and
resume, the Windows `dataset_num_proc`, the evaluation loop, continued pretraining and continuing
from a saved adapter.

Cells the docs elide with `....` get their arguments through a named substitution; the preamble of
each test stands for the notebook's earlier cells (velotune's trainer and arguments imported, a
small local dataset of the docs' shape)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import Dataset

from velotune import FastLanguageModel, SFTTrainer, Trainer, TrainingArguments, UnslothTrainer
from velotune import UnslothTrainingArguments, is_bfloat16_supported

from .local import RAW_TEXT, alpaca_text, tiny_model
from .registry import FRAGMENTS
from .snippets import SMOLLM2, VELOTUNE, Block, Sub, find_block, run_snippet, substitute

TRAINER_ARGS = 'model = model, tokenizer = tokenizer, train_dataset = dataset, dataset_text_field = "text", ' \
               'max_seq_length = 64,'
QUIET = 'report_to = "none", disable_tqdm = True,'


def notebook(model, tokenizer, dataset) -> dict:
    """The names the docs' earlier cells define (`from unsloth import ...` of the trainer classes too)."""
    return {"model": model, "tokenizer": tokenizer, "dataset": dataset, "SFTTrainer": SFTTrainer, "Trainer": Trainer,
            "TrainingArguments": TrainingArguments, "FastLanguageModel": FastLanguageModel,
            "is_bfloat16_supported": is_bfloat16_supported}


def fragments(*names) -> list[Block]:
    return [find_block(text, exact=True) for text, test in FRAGMENTS.items()
            if test.endswith("::" + names[0]) and (len(names) == 1 or text in names[1:])]


def test_tutorial_settings_and_parameters():
    """"Tutorial: How to Finetune Llama-3": its three settings, nine LoRA parameters and four training
    parameters (one block each), put into the notebook's calls, on SmolLM2 in 4 bits as written."""
    blocks = fragments("test_tutorial_settings_and_parameters")
    assert len(blocks) == 16
    settings, lora, training = blocks[:3], blocks[3:12], blocks[12:]
    subs = {"max_seq_length = 2048": Sub("2048", "64", "a tiny max_seq_length on the CPU"),
            "max_steps = 60, # num_train_epochs = 1,": Sub("60", "1", "one step")}
    text = {b.text.strip(): substitute(b.text, [subs[b.text.strip()]] if b.text.strip() in subs else [])
            for b in blocks}

    def cells(group):
        return "\n".join("    " + text[b.text.strip()].strip().replace("\n", "\n    ") for b in group)

    # The notebook's cells around the fragments (written here; the fragments are the docs' text).
    code = "\n".join(text[b.text.strip()] for b in settings) + f"""
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = {SMOLLM2!r},
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
)
model = FastLanguageModel.get_peft_model(
    model,
{cells(lora)}
    max_seq_length = max_seq_length,
)
dataset = Dataset.from_list(alpaca_text(tokenizer))
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    packing = False,
    args = TrainingArguments(
{cells(training)}
        warmup_steps = 5,
        fp16 = not is_bfloat16_supported(),
        bf16 = is_bfloat16_supported(),
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        {QUIET}
    ),
)
trainer_stats = trainer.train()
"""
    scope = notebook(None, None, None) | {"Dataset": Dataset, "alpaca_text": alpaca_text}
    run_snippet(Block(settings[0].line, code), namespace=scope)
    model, trainer = scope["model"], scope["trainer"]
    assert scope["load_in_4bit"] is True and scope["max_seq_length"] == 64
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 16
    assert trainer.args.per_device_train_batch_size == 2 and trainer.args.gradient_accumulation_steps == 4
    assert scope["trainer_stats"].global_step == 1 and math.isfinite(scope["trainer_stats"].training_loss)
    # warmup_steps = 5: the first step's learning rate is 0, so check that the optimizer stepped
    assert trainer.optimizer.state and trainer.state.log_history[0]["learning_rate"] == 0


def test_checkpoints_and_resume(tiny_dir):
    """"Fine-tuning from Checkpoints": save every N steps to `outputs`, then resume from the latest."""
    block = find_block('save_strategy = "steps",')
    resume = find_block("trainer_stats = trainer.train(resume_from_checkpoint = True)", exact=True)
    model, tokenizer = tiny_model(tiny_dir, r=8, lora_alpha=16, random_state=3407)
    scope = notebook(model, tokenizer, Dataset.from_list(RAW_TEXT * 2))

    def subs(steps):
        return [Sub("SFTTrainer(\n    ....\n", f"SFTTrainer(\n    {TRAINER_ARGS}\n", "the docs elide the trainer's "
                    "arguments"),
                Sub("        ....\n",
                    f"        per_device_train_batch_size = 2, max_steps = {steps}, logging_steps = 1, {QUIET}\n",
                    "the docs elide the other training arguments"),
                Sub("save_steps = 50", "save_steps = 1", "a checkpoint every step of a 2-3 step run")]

    run_snippet(block, subs(2), scope)
    scope["trainer"].train()  # the first run, interrupted after step 2
    first = [(e["step"], e["loss"]) for e in scope["trainer"].state.log_history if "loss" in e]
    assert sorted(p.name for p in Path("outputs").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    run_snippet(block, subs(3), scope)  # the cell run again with more steps, then the docs' resume
    run_snippet(resume, namespace=scope)
    stats, trainer = scope["trainer_stats"], scope["trainer"]
    assert stats.global_step == 3 and trainer.state.global_step == 3
    # Steps 1-2 come from checkpoint-2's state; a run from scratch would recompute them on the model the
    # first run already trained (the same object here) and log other losses.
    resumed = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert resumed[:2] == first and [step for step, _ in resumed] == [1, 2, 3]
    assert (Path("outputs") / "checkpoint-3").is_dir()


def test_windows_dataset_num_proc(tiny_dir):
    block = find_block("dataset_num_proc=1,")
    model, tokenizer = tiny_model(tiny_dir, r=8, lora_alpha=16)
    scope = notebook(model, tokenizer, Dataset.from_list(RAW_TEXT))
    run_snippet(block, [Sub("    ...\n", f"    {TRAINER_ARGS}\n    args = TrainingArguments(output_dir = \"outputs\", "
                                         f"max_steps = 1, {QUIET}),\n", "the docs elide the other arguments")],
                scope)
    trainer = scope["trainer"]
    assert trainer.args.dataset_num_proc == 1
    trainer.train()
    assert trainer.state.global_step == 1


def test_evaluation_loop(tiny_dir):
    """"Evaluation Loop - also OOM or crashing": a train/test split and the evaluation settings."""
    block = find_block("fp16_full_eval = True,")
    model, tokenizer = tiny_model(tiny_dir, r=8, lora_alpha=16)
    scope = notebook(model, tokenizer, Dataset.from_list(RAW_TEXT * 25))  # 100 rows: test_size 0.01 = 1 row
    run_snippet(block, [
        Sub("SFTTrainer(\n    args", "trainer = SFTTrainer(\n    model = model, tokenizer = tokenizer, "
            "dataset_text_field = \"text\", max_seq_length = 64,\n    args", "the docs elide the model"),
        Sub("        eval_steps = 1,\n", f"        eval_steps = 1,\n        max_steps = 1, output_dir = \"outputs\", "
            f"{QUIET}\n", "one step"),
        Sub('    eval_dataset = new_dataset["test"],', '    eval_dataset = new_dataset["test"],\n)',
            "the docs' snippet stops before the closing parenthesis"),
    ], scope)
    trainer = scope["trainer"]
    assert trainer.args.fp16_full_eval and trainer.args.eval_strategy == "steps"
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals and math.isfinite(evals[0]["eval_loss"])


def test_continued_pretraining(tiny_dir):
    """"Continued Pretraining": LoRA on lm_head and embed_tokens, and a smaller learning rate for them."""
    peft = find_block('"lm_head", "embed_tokens",],')
    trainer_block = find_block("embedding_learning_rate = 5e-6,")
    base, tokenizer = tiny_model(tiny_dir)
    scope = notebook(base, tokenizer, Dataset.from_list(RAW_TEXT))
    run_snippet(peft, namespace=scope)
    run_snippet(trainer_block, [*VELOTUNE,
                                Sub("UnslothTrainer(\n    ....\n", f"UnslothTrainer(\n    {TRAINER_ARGS}\n",
                                    "the docs elide the trainer's arguments"),
                                Sub("        ....\n", f"        per_device_train_batch_size = 2, max_steps = 1, "
                                    f"output_dir = \"outputs\", {QUIET}\n", "the docs elide the other arguments")],
                scope)
    assert scope["UnslothTrainer"] is UnslothTrainer and scope["UnslothTrainingArguments"] is UnslothTrainingArguments
    model, trainer = scope["model"], scope["trainer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in before) and any("lm_head" in n for n in before)
    trainer.train()
    rates = {group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert rates == {5e-5, 5e-6}, rates
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("embed_tokens" in n for n in changed), sorted(changed)[:5]


def test_continue_from_lora_adapter(tiny_dir):
    """"Loading LoRA adapters for continued finetuning": from_pretrained on a saved adapter folder."""
    block = find_block('model_name = "LORA_MODEL_NAME",')
    trained, tokenizer = tiny_model(tiny_dir, r=8, lora_alpha=16)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    trained.save_pretrained("my_lora")
    tokenizer.save_pretrained("my_lora")
    # The notebook's settings cell (the tutorial's values; a tiny max_seq_length).
    scope = notebook(None, None, Dataset.from_list(RAW_TEXT)) | {"max_seq_length": 64, "dtype": None,
                                                                  "load_in_4bit": True}
    run_snippet(block, [*VELOTUNE,
                        Sub('"LORA_MODEL_NAME"', '"my_lora"', "the folder the adapter was saved to"),
                        Sub("Trainer(...)", f"Trainer({TRAINER_ARGS} args = TrainingArguments("
                            f"per_device_train_batch_size = 2, max_steps = 1, output_dir = \"outputs\", {QUIET}))",
                            "the docs elide the trainer's arguments")], scope)
    model = scope["model"]
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.requires_grad for p in lora_b.values())
    assert scope["trainer"].state.global_step == 1
    # one step of lr 2e-4 from 0.01: the loaded adapter was the starting point, not a fresh one
    assert all(abs(p.float().mean().item() - 0.01) < 1e-3 for p in lora_b.values())


def test_wandb_arguments():
    """"Wandb Integration": the keywords to put in `TrainingArguments()` (the run itself needs wandb and an
    account: not here)."""
    block = find_block('report_to = "wandb",')
    code = substitute(block.text, [Sub("save_steps = 100 #", "save_steps = 100, #",
                                       "the docs' list misses the comma after save_steps")])
    scope = run_snippet(Block(block.line, f'args = TrainingArguments(\n{code}\n, output_dir = "outputs")'),
                        namespace=notebook(None, None, None))
    args = scope["args"]
    assert args.report_to == ["wandb"] and args.logging_steps == 1 and args.save_steps == 100
    assert args.run_name == "<name>"
