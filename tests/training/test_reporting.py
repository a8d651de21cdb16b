"""Seeing the run: progress fields, tokens/s and memory in the logs, the loss plot, the summary, report_to."""

from __future__ import annotations

import importlib.util

import pytest

from velotune.training import SFTTrainer, TrainingArguments
from velotune.training.callbacks import PLOT_NAME, ProgressFieldsCallback

from .helpers import quiet_args, text_dataset
from tiny.folders import tiny_lora


def test_logs_plot_and_summary(tiny_llama_dir, tmp_path, capsys, caplog):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
                                          per_device_eval_batch_size=2, disable_tqdm=False))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(12),
                         eval_dataset=text_dataset(4, seed=9), args=args)
    assert any(isinstance(c, ProgressFieldsCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    out = capsys.readouterr()

    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 4 and all(e["peak_memory_gb"] > 0 for e in train_logs)
    assert all(e["tokens_per_second"] > 0 for e in train_logs[1:])  # from the second log on
    assert len([e for e in trainer.state.log_history if "eval_loss" in e]) == 2
    assert "tok/s" in out.err and "mem GB" in out.err  # on the progress bar
    assert "'grad_norm'" not in out.err + out.out  # no per-step dict printed under the bar (issue 13: noise)
    assert "'eval_loss'" in out.err + out.out  # evaluation results are still printed

    plot = tmp_path / PLOT_NAME
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    summary = trainer.summary.last_summary
    logged = [r.getMessage() for r in caplog.records if r.name == "velotune"]
    assert summary in logged and f"velotune: loss plot written to {plot}" in logged  # the library logs, never prints
    assert summary not in out.out + out.err  # under pytest the application's (pytest's) handlers show it
    for part in ("4 steps in", "tokens/s", "peak memory", "trainable parameters 8,192 of"):
        assert part in summary


def test_callbacks_work_with_plain_trl_trainer(tiny_llama_dir, tmp_path, caplog):
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    from velotune.training import LossPlotCallback, SummaryCallback

    model, tokenizer = tiny_lora(tiny_llama_dir)
    settings = quiet_args(tmp_path, max_steps=2, include_num_input_tokens_seen="non_padding")
    trainer = TRLSFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(8),
                            args=SFTConfig(**settings), callbacks=[LossPlotCallback(), SummaryCallback()])
    trainer.train()
    assert (tmp_path / PLOT_NAME).is_file()
    assert any(r.getMessage().startswith("velotune: trained 2 steps") for r in caplog.records)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_writes_events(tiny_llama_dir, tmp_path):
    """transformers' own TensorBoard callback, as `report_to` selects it; its events land under
    output_dir (transformers 5.x dropped `logging_dir`; TENSORBOARD_LOGGING_DIR overrides)."""
    model, tokenizer = tiny_lora(tiny_llama_dir)
    args = TrainingArguments(**quiet_args(tmp_path, max_steps=2, report_to="tensorboard"))
    SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(8), args=args).train()
    assert list(tmp_path.rglob("events.out.tfevents.*"))
