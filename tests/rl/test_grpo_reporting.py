"""What GRPO users watch: the progress bar's fields, the metrics every `report_to` callback receives, the plot."""

from __future__ import annotations

from datasets import Dataset
from transformers import TrainerCallback

from velotune import FastLanguageModel
from velotune.rl import GRPOConfig, GRPOTrainer
from velotune.rl.callbacks import PLOT_NAME, GRPOProgressCallback, short_reward_name, write_reward_plot


class Recorder(TrainerCallback):
    """Stands where TensorBoard/wandb stand: report_to integrations are callbacks receiving on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def format_reward_func(prompts, completions, **kwargs):
    return [1.0 if c.strip()[:1].isdigit() else 0.0 for c in completions]


def test_bar_and_report_to_callbacks_get_grpo_metrics(tiny_llama_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407,
                                             use_gradient_checkpointing=False)
    recorder = Recorder()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=False, optim="adamw_torch", beta=0.05)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[length_reward, format_reward_func],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]}),
                          callbacks=[recorder])
    bar = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GRPOProgressCallback))
    trainer.train()
    step_log = next(log for log in recorder.logs if "loss" in log)
    for key in ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "clip_ratio/region_mean",
                "rewards/length_reward/mean", "rewards/format_reward_func/std"):
        assert key in step_log, key
    for short in ("reward", "kl", "len", "clip", "entropy", "length", "format"):
        assert short in bar.last_fields, (short, bar.last_fields)


def test_short_names():
    assert short_reward_name("correctness_reward_func") == "correctness"
    assert short_reward_name("proximity_reward") == "proximity"
    assert short_reward_name("mine") == "mine"


def test_reward_plot_never_overwrites_a_users_file(tmp_path):
    (tmp_path / PLOT_NAME).write_bytes(b"my picture")
    history = [{"step": 1, "reward": 0.1, "rewards/f/mean": 0.1}, {"step": 2, "reward": 0.4, "rewards/f/mean": 0.4}]
    path = write_reward_plot(history, tmp_path)
    assert path.name == "training_reward-2.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / PLOT_NAME).read_bytes() == b"my picture"
    assert write_reward_plot([{"step": 1, "loss": 1.0}], tmp_path / "none") is None
