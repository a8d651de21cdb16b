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


@pytest.mark.parametrize("batch,accumulation,generations,fitted", [
    (1, 1, 6, 6), (1, 4, 8, 8), (1, 4, 6, 6), (6, 1, 4, 4), (10, 1, 4, 8), (2, 4, 8, 2), (3, 2, 6, 3)])
def test_the_docs_batch_is_fitted_to_whole_groups_with_one_notice(tmp_path, caplog, batch, accumulation,
                                                                 generations, fitted):
    """The docs' notebooks pass per_device_train_batch_size=1 with 6 or 8 generations (TRL 1.x refuses it):
    a generation batch that cannot hold whole groups becomes the largest multiple of num_generations not above
    it (at least one group), as Unsloth does; TRL-valid settings (2 x 4 holds one group of 8) stay as given."""
    with caplog.at_level(logging.WARNING, logger="velotune"):
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch, num_generations=generations,
                          gradient_accumulation_steps=accumulation, report_to="none")
    assert args.per_device_train_batch_size == fitted
    assert args.generation_batch_size == fitted * accumulation
    assert args.generation_batch_size % generations == 0
    notices = [r.getMessage() for r in caplog.records if "per_device_train_batch_size=" in r.getMessage()]
    if fitted == batch:
        assert notices == []
    else:
        assert len(notices) == 1 and f"per_device_train_batch_size={batch} -> {fitted}" in notices[0]


def test_the_docs_grpo_config_cell_trains_as_written(tiny_llama_dir, tmp_path):
    """The notebooks' GRPOConfig cell as written (substitutions: output_dir -> tmp, max_steps 250 -> 1): batch 1
    with 6 generations trains one prompt's 6 completions per step."""
    from velotune import is_bfloat16_supported

    training_args = GRPOConfig(
        use_vllm = True, # use vLLM for fast inference!
        learning_rate = 5e-6,
        adam_beta1 = 0.9,
        adam_beta2 = 0.99,
        weight_decay = 0.1,
        warmup_ratio = 0.1,
        lr_scheduler_type = "cosine",
        optim = "paged_adamw_8bit",
        logging_steps = 1,
        bf16 = is_bfloat16_supported(),
        fp16 = not is_bfloat16_supported(),
        per_device_train_batch_size = 1,
        gradient_accumulation_steps = 1, # Increase to 4 for smoother training
        num_generations = 6, # Decrease if out of memory
        max_prompt_length = 256,
        max_completion_length = 200,
        # num_train_epochs = 1, # Set to 1 for a full training run
        max_steps = 1,  # 250 in the notebook
        save_steps = 250,
        max_grad_norm = 0.1,
        report_to = "none", # Can use Weights & Biases
        output_dir = str(tmp_path),  # "outputs" in the notebook
    )  # noqa: E251 - the notebook's spelling
    assert (training_args.per_device_train_batch_size, training_args.generation_batch_size) == (6, 6)
    model, tokenizer = tiny_lora(tiny_llama_dir)
    seen = []

    def count(prompts, completions, **kwargs):
        seen.append(list(prompts))
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[count], args=training_args,
                          train_dataset=rows())
    trainer.train()
    assert trainer.state.global_step == 1
    assert len(seen) == 1 and len(seen[0]) == 6 and len(set(seen[0])) == 1  # one prompt, 6 completions


def test_settings_that_cannot_work_say_what_works(tmp_path):
    with pytest.raises(ValueError) as error:
        GRPOConfig(output_dir=str(tmp_path), generation_batch_size=6, num_generations=4, report_to="none")
    message = str(error.value)
    assert "generation_batch_size in [4, 8, 12, 16]" in message and "num_generations in [2, 3, 6]" in message
    with pytest.raises(ValueError, match=r"num_generations=1: .* at least 2"):
        GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=1, report_to="none")
    GRPOConfig(output_dir=str(tmp_path), generation_batch_size=12, num_generations=6, per_device_train_batch_size=6,
               report_to="none")


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
