"""Preference trainers' inputs: empty answers refused by row before any work, the docs' keywords mapped
onto the configs, max_prompt_length cutting prompts as TRL < 1.0 did, and no hub token in checkpoints."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments as HFTrainingArguments
from trl import DPOTrainer as TRLDPOTrainer

import velotune
from velotune import CPOConfig, CPOTrainer, DPOConfig, DPOTrainer, FastLanguageModel, KTOTrainer, ORPOTrainer

PAIRS = [{"prompt": "abcdefghij", "chosen": " yes", "rejected": " no"},
         {"prompt": "klmnopqrst", "chosen": " fine", "rejected": " bad"},
         {"prompt": "uv", "chosen": " good", "rejected": " worse"}]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False,
                                                         device_map="cpu", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    return model, tokenizer


def config(tmp_path, cls=DPOConfig, **kwargs):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                    save_strategy="no", bf16=False, fp16=False, use_cpu=True, disable_tqdm=True,
                    gradient_checkpointing=False)
    settings.update(kwargs)
    return cls(**settings)


# ----- empty answers -----
@pytest.mark.parametrize("trainer_cls", [DPOTrainer, ORPOTrainer, CPOTrainer])
def test_empty_rejected_answer_names_the_row_and_column(tiny, tmp_path, trainer_cls):
    model, tokenizer = tiny
    rows = [dict(r) for r in PAIRS]
    rows[2]["rejected"] = "   "
    args = config(tmp_path, getattr(velotune, trainer_cls.__name__.replace("Trainer", "Config")))
    with pytest.raises(ValueError, match=r"train_dataset row 2: the 'rejected' answer is empty"):
        trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert list(model.peft_config) == ["default"]  # refused before TRL touched the model


def test_empty_conversational_answer_in_an_eval_split(tiny, tmp_path):
    model, tokenizer = tiny
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go"}]}] * 2
    broken = [dict(chat[0]), dict(chat[0], chosen=[{"role": "assistant", "content": ""}])]
    with pytest.raises(ValueError, match=r"eval_dataset\['held'\] row 1: the 'chosen' answer is empty"):
        DPOTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(chat),
                   eval_dataset={"held": Dataset.from_list(broken)}, processing_class=tokenizer)


def test_missing_answer_column_lists_the_columns(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"prompt": "a", "answer": "b"}] * 2
    with pytest.raises(ValueError, match=r"train_dataset has no 'chosen' / 'rejected' column .*'prompt', 'answer'"):
        DPOTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer)


def test_kto_empty_completion(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [{"prompt": "ab", "completion": " c", "label": True}, {"prompt": "de", "completion": None, "label": False}]
    with pytest.raises(ValueError, match=r"train_dataset row 1: the 'completion' answer is empty"):
        KTOTrainer(model=model, args=config(tmp_path, velotune.KTOConfig), train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer)


def test_kto_takes_paired_rows_and_checks_them(tiny, tmp_path):
    """TRL's KTO unpairs chosen/rejected rows itself: those are accepted, and checked as pairs."""
    model, tokenizer = tiny
    trainer = KTOTrainer(model=model, args=config(tmp_path, velotune.KTOConfig), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(PAIRS))
    assert sorted(trainer.train_dataset["label"]) == [False] * 3 + [True] * 3
    rows = [dict(r) for r in PAIRS]
    rows[1]["chosen"] = ""
    with pytest.raises(ValueError, match=r"train_dataset row 1: the 'chosen' answer is empty"):
        KTOTrainer(model=model, args=config(tmp_path, velotune.KTOConfig), train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer)


# ----- the docs' keywords -----
def test_transformers_arguments_and_trainer_keywords_become_a_dpo_config(tiny, tmp_path):
    """The docs' cell under TRL < 1.0: transformers' TrainingArguments (its learning rate 5e-5, no gradient
    checkpointing), beta/max_length/max_prompt_length and tokenizer given to the trainer."""
    model, tokenizer = tiny
    args = HFTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                               report_to="none", use_cpu=True, save_strategy="no")
    trainer = DPOTrainer(model, None, args, beta=0.25, train_dataset=Dataset.from_list(PAIRS), tokenizer=tokenizer,
                         max_length=32, max_prompt_length=4, loss_type="ipo")
    assert type(trainer.args) is DPOConfig and trainer.processing_class is tokenizer
    assert (trainer.args.beta, trainer.args.max_length, trainer.args.max_prompt_length) == (0.25, 32, 4)
    assert trainer.args.loss_type == ["ipo"] and trainer.args.learning_rate == 5e-5
    assert trainer.args.gradient_checkpointing is False and trainer.args.max_steps == 1


def test_tokenizer_and_processing_class_disagreeing_is_an_error(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="pass the tokenizer once"):
        DPOTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(PAIRS), tokenizer=tokenizer,
                   processing_class=copy.deepcopy(tokenizer))


def test_max_prompt_length_keeps_the_end_of_the_prompt(tiny, tmp_path):
    model, tokenizer = tiny
    trainer = DPOTrainer(model=model, args=config(tmp_path, max_prompt_length=4, max_length=32),
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    full = [tokenizer(row["prompt"])["input_ids"] for row in PAIRS]
    assert trainer.train_dataset["prompt_ids"] == [ids[-4:] for ids in full]


def test_max_prompt_length_in_orpo_rows(tiny, tmp_path):
    model, tokenizer = tiny
    trainer = ORPOTrainer(model=model, args=config(tmp_path, velotune.ORPOConfig, max_prompt_length=3, max_length=32),
                          train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert len(row["prompt_input_ids"]) == 3
    for side in ("chosen", "rejected"):
        labels = row[f"{side}_labels"]
        assert labels[:3] == [-100] * 3 and labels[3] != -100
        assert row[f"{side}_input_ids"][:3] == row["prompt_input_ids"]


@pytest.mark.parametrize("value,match", [(0, "positive"), (32, "below max_length=32")])
def test_bad_max_prompt_length(tmp_path, value, match):
    with pytest.raises(ValueError, match=f"max_prompt_length={value}.*{match}"):
        config(tmp_path, max_prompt_length=value, max_length=32)


def test_docs_older_keywords_on_the_configs(tmp_path):
    args = config(tmp_path, CPOConfig, warmup_ratio=0.1, max_seq_length=48, evaluation_strategy="no",
                  loss_type="simpo", fp16=True)
    assert args.warmup_steps == 0.1 and args.max_length == 48 and args.loss_type == "simpo"
    if not torch.cuda.is_available():
        assert args.fp16 is False  # fp16 is emulated (18x slower) on a CPU: trains in fp32, as SFT does


# ----- the hub token -----
@pytest.mark.parametrize("trainer_cls", [DPOTrainer, TRLDPOTrainer], ids=["velotune", "trl"])
def test_hub_token_is_not_written_into_training_args_bin(tiny, tmp_path, trainer_cls):
    model, tokenizer = tiny
    args = config(tmp_path, hub_token="hf_secret_value")
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "saved"))
    stored = (tmp_path / "saved" / "training_args.bin").read_bytes()
    assert b"hf_secret_value" not in stored
    assert torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False).hub_token is None
    assert trainer.args.hub_token == "hf_secret_value"  # the run itself keeps it (push_to_hub)
    assert copy.deepcopy(args).hub_token == copy.copy(args).hub_token == "hf_secret_value"
    assert pickle.loads(pickle.dumps(args)).hub_token is None
    if "ref" in model.peft_config:  # TRL's own trainer copied the adapter; leave the shared model as it was
        model.delete_adapter("ref")


def test_max_length_defaults_to_from_pretrained_max_seq_length(tiny, tmp_path):
    """As velotune's SFTTrainer: the docs set the length once, in from_pretrained (64 here)."""
    model, tokenizer = tiny
    trainer = DPOTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tokenizer)
    assert trainer.args.max_length == 64
    given = DPOTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(PAIRS),
                       processing_class=tokenizer, max_length=40)
    assert given.args.max_length == 40
