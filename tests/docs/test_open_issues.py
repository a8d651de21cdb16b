"""Docs snippets whose feature belongs to an open issue. The tests are written with their
substitutions and skipped; the issue that lands the feature removes the skip."""

from __future__ import annotations

import pytest
from datasets import Dataset

from .snippets import SMOLLM2, VELOTUNE, Sub, find_block, run_snippet


@pytest.mark.skip(reason="issue 16: fast_generate / fast_inference (vLLM-style fast generation) is not implemented")
def test_fast_inference_vllm():
    block = find_block('model.fast_generate(["Hello!"])')
    scope = run_snippet(block, [Sub("pip install unsloth vllm\n", "", "installation line of the cell"), *VELOTUNE,
                                Sub('"unsloth/Llama-3.2-3B-Instruct"', repr(SMOLLM2), "the offline model")])
    assert scope["model"] is not None


@pytest.mark.skip(reason="issue 17: PatchDPOTrainer / DPO through TRL's DPOTrainer is not implemented")
def test_dpo():
    block = find_block("PatchDPOTrainer()")
    rows = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 2
    scope = {"max_seq_length": 64, "dataset": Dataset.from_list(rows)}
    run_snippet(block, [Sub("python\n", "", "the page's language tag leaked into the cell"), *VELOTUNE,
                        Sub('"unsloth/zephyr-sft-bnb-4bit"', repr(SMOLLM2), "the offline model"),
                        Sub("num_train_epochs = 3,", "max_steps = 1,", "one step"),
                        Sub("train_dataset = YOUR_DATASET_HERE,", "train_dataset = dataset,",
                            "local prompt/chosen/rejected rows")], scope)
    assert scope["dpo_trainer"].state.global_step == 1
