"""velotune's GRPOTrainer on a tiny random Llama: the loop, what it logs, the reference pass, bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from tiny.folders import tiny_lora
from velotune.rl import GRPOConfig, GRPOTrainer, PatchFastRL, RewardFunctionError
from velotune.rl.callbacks import PLOT_NAME
from velotune.rl.reward_calls import call_reward_functions


def rows(n=8):
    return Dataset.from_dict({"prompt": [f"q{i} abc" for i in range(n)], "answer": [str(i) for i in range(n)]})


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=6, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                    save_strategy="no", disable_tqdm=True, optim="adamw_torch", seed=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def by_length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def trainer(tiny_llama_dir, tmp_path, funcs=(by_length,), dataset=None, **overrides):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    return GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=list(funcs),
                       args=config(tmp_path, **overrides), train_dataset=dataset if dataset is not None else rows())


def test_steps_log_what_users_watch_and_plot_the_reward(tiny_llama_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="velotune")
    t = trainer(tiny_llama_dir, tmp_path, sample_completions_steps=1)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.train()
    logs = [e for e in t.state.log_history if "loss" in e]
    assert len(logs) == 2
    for key in ("reward", "reward_std", "rewards/by_length/mean", "rewards/by_length/std", "completions/mean_length",
                "clip_ratio/region_mean", "entropy"):
        assert all(math.isfinite(e[key]) for e in logs), key
    assert (tmp_path / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "sample completions at step 1" in logged and "by_length=" in logged
    assert f"reward plot written to {tmp_path / PLOT_NAME}" in logged
    changed = [n for n, p in t.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no adapter weight moved"


def test_beta_uses_the_adapter_disabled_model_as_reference(tiny_llama_dir, tmp_path):
    t = trainer(tiny_llama_dir, tmp_path, beta=0.1, max_steps=3, learning_rate=5e-2)
    assert t.ref_model is None  # no second copy: the reference is the model with adapters disabled
    t.train()
    kls = [e["kl"] for e in t.state.log_history if "kl" in e]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # step 1: adapters still at their LoRA init (B = 0)
    assert kls[-1] > 0  # the policy moved away from the reference


def test_num_iterations_reuses_one_generation(tiny_llama_dir, tmp_path):
    t = trainer(tiny_llama_dir, tmp_path, num_iterations=2, max_steps=2)
    calls = []
    original = t._generate_and_score
    t._generate_and_score = lambda batch: calls.append(1) or original(batch)
    t.train()
    assert len(calls) == 1  # two optimizer steps on one generation batch, the second one with clipping active


def test_conversational_prompts_get_assistant_messages(tiny_llama_dir, tmp_path):
    seen = []

    def spy(prompts, completions, answer, **kwargs):
        seen.append((completions[0], answer[0], kwargs["completion_ids"][0]))
        return [0.0] * len(completions)

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi there"}]] * 4, "answer": ["a"] * 4})
    t = trainer(tiny_llama_dir, tmp_path, funcs=[spy], dataset=data, max_steps=1)
    with pytest.raises(ValueError, match="conversational prompts need the tokenizer's chat template"):
        t.train()
    t.processing_class.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    t.train()
    completion, answer, ids = seen[0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert answer == "a" and isinstance(ids, list)


def test_patch_fast_rl_is_a_no_op():
    from velotune import FastLanguageModel

    assert PatchFastRL("GRPO", FastLanguageModel) is None
    with pytest.raises(TypeError, match="algorithm"):
        PatchFastRL(3)


# ----- bad input (issue 17) -----
def test_dataset_without_prompt_lists_its_columns(tiny_llama_dir, tmp_path):
    data = Dataset.from_dict({"question": ["a"] * 4, "answer": ["b"] * 4})
    with pytest.raises(ValueError, match=r"no 'prompt' column; its columns are \['question', 'answer'\]"):
        trainer(tiny_llama_dir, tmp_path, dataset=data)


def test_batch_not_divisible_by_num_generations_says_what_works(tmp_path):
    with pytest.raises(ValueError) as error:
        GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=4, report_to="none")
    message = str(error.value)
    assert "num_generations=4" in message and "num_generations in [2, 3, 6]" in message
    assert "per_device_train_batch_size in [4, 8, 12, 16]" in message
    GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, report_to="none")


def test_reward_function_that_raises_names_function_step_and_completion():
    def picky(prompts, completions, **kwargs):
        return [1.0 / (len(c) - 3) for c in completions]  # fails on the 3-character completion

    expected = r"'picky' raised ZeroDivisionError.* at step 7 on completion 1: 'abc'"
    with pytest.raises(RewardFunctionError, match=expected):
        call_reward_functions([picky], ["p"] * 3, ["abcd", "abc", "abcde"], {}, step=7)


@pytest.mark.parametrize("result,match", [
    ([1.0], r"'bad' returned 1 values for 2 completions at step 3"),
    (0.5, r"'bad' returned float at step 3; it must return a list of 2 floats"),
    ([1.0, "yes"], r"'bad' returned 'yes' \(str\) for completion 1 at step 3.*Completion: 'yy'"),
])
def test_reward_function_wrong_length_or_type(result, match):
    def bad(prompts, completions, **kwargs):
        return result

    with pytest.raises(RewardFunctionError, match=match):
        call_reward_functions([bad], ["p", "p"], ["xx", "yy"], {}, step=3)


def test_nan_rewards_are_skipped_with_a_warning_and_counted(tiny_llama_dir, tmp_path, caplog):
    def sometimes(prompts, completions, **kwargs):
        return [math.nan if i % 4 == 0 else 1.0 + i for i in range(len(completions))]

    t = trainer(tiny_llama_dir, tmp_path, funcs=[sometimes, by_length], max_steps=1)
    with caplog.at_level("WARNING", logger="velotune"):
        t.train()
    assert "NaN/None rewards skipped" in caplog.text and "'sometimes': 1 of 4" in caplog.text
    log = next(e for e in t.state.log_history if "reward" in e)
    assert log["rewards/sometimes/nan"] == 1
    assert log["rewards/sometimes/mean"] == pytest.approx((2 + 3 + 4) / 3)  # the NaN is not averaged in
    assert math.isfinite(log["reward"]) and math.isfinite(log["loss"])


def test_reward_weights_must_match_the_functions(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights has 2 values for 1 reward functions \(\['by_length'\]\)"):
        trainer(tiny_llama_dir, tmp_path, reward_weights=[1.0, 2.0])


def test_reward_funcs_must_be_functions(tiny_llama_dir, tmp_path):
    with pytest.raises(TypeError, match=r"reward_funcs\[1\] is a int"):
        trainer(tiny_llama_dir, tmp_path, funcs=[by_length, 3])


def test_full_fine_tuning_gets_one_frozen_reference_copy(tiny_llama_dir, tmp_path):
    from velotune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model.requires_grad_(True)
    t = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[by_length], train_dataset=rows(),
                    args=config(tmp_path, beta=0.1, max_steps=3, learning_rate=1e-3))
    assert t.ref_model is not None and not any(p.requires_grad for p in t.ref_model.parameters())
    t.train()
    moved = sum((p - q).abs().sum().item() for p, q in zip(t.model.parameters(), t.ref_model.parameters()))
    assert moved > 0  # the policy trained, the reference stayed where it started
    assert [e["kl"] for e in t.state.log_history if "kl" in e][-1] > 0
