"""Docs snippets of features that landed with the later issues (fast generation, preference training):
run as written, with their substitutions listed."""

from __future__ import annotations

from datasets import Dataset

from .snippets import SMOLLM2, VELOTUNE, Sub, find_block, run_snippet


def test_fast_inference_vllm():
    """The docs' vLLM cell: `fast_inference=True`, then `model.fast_generate(["Hello!"])` on velotune's engine
    (vLLM's result shape: RequestOutput.outputs[0].text / .token_ids)."""
    block = find_block('model.fast_generate(["Hello!"])')
    scope = run_snippet(block, [Sub("pip install unsloth vllm\n", "", "installation line of the cell"), *VELOTUNE,
                                Sub('"unsloth/Llama-3.2-3B-Instruct"', repr(SMOLLM2), "the offline model"),
                                Sub('model.fast_generate(["Hello!"])', 'outputs = model.fast_generate(["Hello!"])',
                                    "keep the result to check it")])
    (request,) = scope["outputs"]
    completion = request.outputs[0]
    assert completion.token_ids and completion.text.strip()
    assert completion.finish_reason in ("stop", "length")


def test_dpo():
    """The docs' DPO cell. Its two imports name transformers' and TRL's classes, which cannot take the cell's
    keywords any more (transformers 5 removed warmup_ratio; TRL 1.x moved beta/max_length/max_prompt_length
    into DPOConfig and renamed tokenizer) and velotune patches neither library: the cell imports velotune's
    classes instead, the one change a user makes (tests/rl/test_preference.py trains TRL's own DPOTrainer)."""
    block = find_block("PatchDPOTrainer()")
    rows = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 2
    scope = {"max_seq_length": 64, "dataset": Dataset.from_list(rows)}
    run_snippet(block, [Sub("python\n", "", "the page's language tag leaked into the cell"), *VELOTUNE,
                        Sub("from transformers import TrainingArguments", "from velotune import TrainingArguments",
                            "transformers 5's TrainingArguments has no warmup_ratio; velotune's maps it"),
                        Sub("from trl import DPOTrainer", "from velotune import DPOTrainer",
                            "TRL 1.x's DPOTrainer takes no beta/tokenizer/max_length/max_prompt_length keywords; "
                            "velotune's subclass moves them into its DPOConfig"),
                        Sub('"unsloth/zephyr-sft-bnb-4bit"', repr(SMOLLM2), "the offline model"),
                        Sub("num_train_epochs = 3,", "max_steps = 1,", "one step"),
                        Sub("train_dataset = YOUR_DATASET_HERE,", "train_dataset = dataset,",
                            "local prompt/chosen/rejected rows")], scope)
    trainer = scope["dpo_trainer"]
    assert trainer.state.global_step == 1
    assert trainer.args.beta == 0.1 and trainer.args.max_prompt_length == 512 and trainer.args.max_length == 1024
    assert trainer.args.warmup_steps == 0.1  # warmup_ratio = 0.1, as transformers 5 spells it
    assert list(scope["model"].peft_config) == ["default"]  # the reference is the adapter-disabled model
