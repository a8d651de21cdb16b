"""The FSDP2 switch and its bad input, in one process (no launch): what `fsdp` / `fsdp_config` mean to
velotune, what it refuses before any work (4-bit weights, accelerate's own FSDP config, options its
sharding does not do, an export after a sharded CLI run), and `velotune consolidate` on a folder that is
not a distributed checkpoint."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from velotune import FastLanguageModel, SFTTrainer, TrainingArguments
from velotune.cli import main
from velotune.fast.plan import is_sharded
from velotune.training import fsdp

from .fsdp_trainer_worker import rows


def arguments(tmp_path, **fields) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, max_length=64,
                             optim="adamw_torch", disable_tqdm=True, dataset_num_proc=None, **fields)


def test_the_switch_is_transformers_fsdp_argument(tmp_path):
    assert fsdp.requested(arguments(tmp_path)) is None
    assert fsdp.requested(arguments(tmp_path, fsdp=True)) == fsdp.Sharding(reshard_after_forward=True)
    assert fsdp.requested(arguments(tmp_path, fsdp="full_shard auto_wrap")).reshard_after_forward is True
    assert fsdp.requested(arguments(tmp_path, fsdp="shard_grad_op")).reshard_after_forward is False
    assert fsdp.requested(arguments(tmp_path, fsdp=True, fsdp_config={"reshard_after_forward": False})) == \
        fsdp.Sharding(reshard_after_forward=False)
    policy = fsdp.Sharding().mixed_precision(arguments(tmp_path, bf16=True), torch.device("cuda"))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)  # GPUs: bf16 gather/fp32 sum
    policy = fsdp.Sharding().mixed_precision(arguments(tmp_path, bf16=False), torch.device("cpu"))
    assert (policy.param_dtype, policy.reduce_dtype) == (None, torch.float32)  # the CPU: the loaded dtype (fp32)


def test_memory_estimate_counts_one_gpus_share_of_the_sharded_terms():
    from velotune.training.memory import MemoryEstimate

    whole = MemoryEstimate(weights=16, trainable=16, gradients=16, optimizer=32, activations=5, tokens=2048,
                           checkpointing=True)
    assert fsdp.per_rank(whole, 2).total == 8 + 8 + 16 + 5  # activations are each rank's own


def test_options_velotune_does_not_shard_with_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"version=1: velotune shards with FSDP2"):
        fsdp.requested(arguments(tmp_path, fsdp=True, fsdp_config={"version": 1}))
    with pytest.raises(ValueError, match=r"cpu_offload=True"):
        fsdp.requested(arguments(tmp_path, fsdp=True, fsdp_config={"cpu_offload": True}))
    with pytest.raises(ValueError, match=r"activation_checkpointing=True: use get_peft_model"):
        fsdp.requested(arguments(tmp_path, fsdp=True, fsdp_config={"activation_checkpointing": True}))


def test_trainer_refuses_nf4_and_accelerates_fsdp_config_before_any_work(ddp_tiny_dir, tmp_path, monkeypatch):
    data = Dataset.from_dict({"text": rows(4)})
    model, tokenizer = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=True, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    with pytest.raises(ValueError, match=r"cannot shard 4-bit \(NF4\) weights.*drop fsdp \(DDP"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=arguments(tmp_path, fsdp=True))
    model, tokenizer = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"accelerate launch` with an FSDP config.*launch with torchrun"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=arguments(tmp_path, fsdp=True))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args = arguments(tmp_path, fsdp=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)
    assert args.fsdp and not trainer.args.fsdp  # the caller's arguments keep the switch; accelerate never sees it
    assert trainer._sharding == fsdp.Sharding() and not is_sharded(trainer.model)  # one process: unsharded
    assert not any(p.name.startswith("checkpoint") for p in tmp_path.iterdir())


def test_cli_refuses_an_export_after_a_sharded_run_and_explains_consolidate(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(f"training: {{output_dir: '{tmp_path / 'out'}', fsdp: true}}\n"
                                          "export: {gguf: [q8_0]}\n")
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
    assert "training.fsdp with an export section" in capsys.readouterr().err
    assert main(["consolidate", str(tmp_path), str(tmp_path / "merged")]) == 2
    assert "is not a distributed checkpoint of a sharded run" in capsys.readouterr().err


def test_cli_sharded_recipe_in_one_process_then_consolidate(ddp_tiny_dir, tmp_path, capsys):
    """`training: {fsdp: true}` without a launcher trains unsharded but writes distributed checkpoints, which
    `velotune consolidate` turns into the same adapter the run saved."""
    from safetensors.torch import load_file

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "{text}"}}\n' for text in rows(8)))
    out = tmp_path / "out"
    (tmp_path / "recipe.yaml").write_text(
        f"model: {{model_name: '{ddp_tiny_dir}', max_seq_length: 64, load_in_4bit: false}}\n"
        "lora: {r: 8, lora_alpha: 16}\n"
        f"data: {{path: '{data}'}}\n"
        f"training: {{output_dir: '{out}', fsdp: true, max_steps: 2, per_device_train_batch_size: 2, "
        "save_strategy: steps, save_steps: 2, optim: adamw_torch, disable_tqdm: true}\n")
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    assert (out / "checkpoint-2" / "model_dcp" / ".metadata").is_file()
    assert main(["consolidate", str(out / "checkpoint-2"), str(tmp_path / "adapter")]) == 0
    assert "velotune: consolidated" in capsys.readouterr().out
    saved, consolidated = (load_file(f / "adapter_model.safetensors")
                           for f in (out / "lora_model", tmp_path / "adapter"))
    assert saved.keys() == consolidated.keys() and saved
    for name in saved:
        torch.testing.assert_close(saved[name], consolidated[name], msg=name)


def test_saving_or_exporting_a_sharded_model_names_the_way(ddp_tiny_dir, tmp_path):
    """A one-rank process group is enough to shard (every weight becomes a DTensor): the model's own save and
    export methods then refuse with the two ways that work, instead of writing this rank's parts."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(ddp_tiny_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fsdp.shard(model, fsdp.Sharding(), arguments(tmp_path))
        assert is_sharded(model)
        for call in (lambda: model.save_pretrained(tmp_path / "a"),
                     lambda: model.save_pretrained_merged(tmp_path / "m", tokenizer)):
            with pytest.raises(ValueError, match=r"sharded over the ranks.*trainer.save_model\(DIR\) on every rank"):
                call()
        assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()
    finally:
        torch.distributed.destroy_process_group()
