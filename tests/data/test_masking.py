"""Response-only masking: every registry template (multi-turn), a real TRL SFTTrainer batch over a
tiny random Llama, the transformers Trainer path, the collator, and each loud failure."""

import warnings

import pytest
import torch
from datasets import Dataset

from conftest import A1, A2, A3, SYSTEM, U1, U2, U3
from velotune.chat_templates import CHAT_TEMPLATES, DataCollatorForResponseOnly, get_chat_template, train_on_responses_only
from velotune.data.masking import IGNORE_INDEX, ResponseMarkerError, ResponseMasker
from velotune.data.responses import infer_markers


def trained_runs(tokenizer, ids, labels):
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_every_template_trains_only_the_answers(name, tokenizer, conversation):
    get_chat_template(tokenizer, name)  # map_eos_token=True: stop tokens SmolLM2 lacks become its EOS
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    result = ResponseMasker(tokenizer, *infer_markers(tokenizer)).mask(ids)
    runs = trained_runs(tokenizer, ids, result.labels)
    assert len(runs) == 3, runs
    for run, answer in zip(runs, (A1, A2, A3)):
        assert run.strip().startswith(answer)  # the answer is trained from its first token ...
        assert tokenizer.eos_token in run  # ... through the token that ends the turn
        assert not any(x in run for x in (U1, U2, U3, SYSTEM))


def test_markers_that_bpe_merges_in_context(tokenizer, conversation):
    """">>> Assistant: " ends in a space that SmolLM2 merges with the answer's first word, so the
    marker's own token ids never occur in the sequence; text matching still finds it."""
    get_chat_template(tokenizer, "unsloth")
    ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    marker = tokenizer(">>> Assistant: ", add_special_tokens=False)["input_ids"]
    assert not any(ids[i:i + len(marker)] == marker for i in range(len(ids)))
    labels = ResponseMasker(tokenizer, ">>> User: ", ">>> Assistant: ").mask(ids).labels
    runs = trained_runs(tokenizer, ids, labels)
    assert [r.strip() for r in runs] == [f"{A1}<|im_end|>", f"{A2}<|im_end|>", f"{A3}<|im_end|>"]


def test_packed_rows_are_masked_per_sequence(tokenizer):
    one = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")["input_ids"]
    two = tokenizer("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nok<|im_end|>\n")["input_ids"]
    masker = ResponseMasker(tokenizer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    packed = masker.mask_packed(one + two, None, [len(one), len(two)])
    assert trained_runs(tokenizer, one + two, packed.labels) == ["yo<|im_end|>\n"]  # two's system turn untouched


# --------------------------------------------------------------------------- trainers
@pytest.fixture
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def sft_trainer(model, tokenizer, dataset, tmp_path, **config):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     max_length=config.pop("max_length", 128), use_cpu=True, save_strategy="no", logging_steps=1,
                     shuffle_dataset=False, **config)
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)


def chat_rows(n=4):
    return [[{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": f"It is {2 * i}."},
             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
            for i in range(n)]


def test_sft_trainer_real_batch(tokenizer, tiny_llama, tmp_path):
    """SmolLM2's own template (markers inferred), conversational data, the trainer's own collator."""
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"messages": chat_rows()}), tmp_path)
    trainer = train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    runs = [trained_runs(tokenizer, ids, labels) for ids, labels in zip(batch["input_ids"].tolist(),
                                                                        batch["labels"].tolist())]
    assert sorted(runs) == [[f"It is {2 * i}.<|im_end|>\n", "You are welcome.<|im_end|>\n"] for i in range(4)]
    loss = trainer.train().training_loss
    assert torch.isfinite(torch.tensor(loss))


def test_sft_trainer_with_explicit_markers_and_text_data(tokenizer, tiny_llama, tmp_path):
    get_chat_template(tokenizer, "llama-3")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chat_rows()]
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"text": texts}), tmp_path)
    train_on_responses_only(trainer, instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
                            response_part="<|start_header_id|>assistant<|end_header_id|>\n\n")
    row = trainer.train_dataset[0]
    assert trained_runs(tokenizer, row["input_ids"], row["labels"]) == ["It is 0.<|im_end|>", "You are welcome.<|im_end|>"]


def test_markers_that_never_match_raise(tokenizer, tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"messages": chat_rows()}), tmp_path)
    with pytest.raises(ResponseMarkerError) as err:
        train_on_responses_only(trainer, instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
                                response_part="<|start_header_id|>assistant<|end_header_id|>\n\n")
    message = str(err.value)
    assert "the response marker never occurs" in message
    assert "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'" in message  # names the markers
    assert "<|im_start|>user\\nWhat is 0+0?" in message  # shows a rendered row


def test_instruction_marker_missing_in_multi_turn_raises(tokenizer, tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"messages": chat_rows()}), tmp_path)
    with pytest.raises(ResponseMarkerError, match="instruction marker never occurs"):
        train_on_responses_only(trainer, instruction_part="### Human:", response_part="<|im_start|>assistant\n")


def test_partial_match_warns_with_counts_and_drops(tokenizer, tiny_llama, tmp_path):
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chat_rows(3)] + ["Just some raw text."]
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"text": texts}), tmp_path)
    with pytest.warns(UserWarning, match="matched only 3 of 4 rows .* the 1 rows without it"):
        train_on_responses_only(trainer)
    assert len(trainer.train_dataset) == 3


def test_transformers_trainer_gets_the_response_collator(tokenizer, tiny_llama, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    get_chat_template(tokenizer, "chatml")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chat_rows()]
    ds = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    trainer = Trainer(model=tiny_llama, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                               per_device_train_batch_size=2),
                      train_dataset=ds, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    train_on_responses_only(trainer)
    assert isinstance(trainer.data_collator, DataCollatorForResponseOnly)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    runs = trained_runs(tokenizer, ids, labels)
    assert runs[0] in {f"It is {2 * i}.<|im_end|>\n" for i in range(4)} and runs[1] == "You are welcome.<|im_end|>\n"


# --------------------------------------------------------------------------- collator
def test_collator_pads_and_masks(tokenizer):
    get_chat_template(tokenizer, "chatml")
    rows = [{"input_ids": tokenizer(tokenizer.apply_chat_template(c, tokenize=False))["input_ids"]}
            for c in chat_rows(2)]
    rows[1]["input_ids"] = rows[1]["input_ids"][:-3]  # uneven lengths
    collator = DataCollatorForResponseOnly(tokenizer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    batch = collator(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(rows[1]["input_ids"])
    assert (batch["labels"][1, len(rows[1]["input_ids"]):] == IGNORE_INDEX).all()
    assert trained_runs(tokenizer, batch["input_ids"][0].tolist(), batch["labels"][0].tolist())[0] == "It is 0.<|im_end|>\n"


def test_collator_refuses_an_all_masked_batch(tokenizer):
    collator = DataCollatorForResponseOnly(tokenizer, "USER:", "ASSISTANT:")
    with pytest.raises(ResponseMarkerError, match="No token in this batch lies inside an assistant response"):
        collator([{"input_ids": tokenizer("hello there")["input_ids"]}])


def test_marker_inference(tokenizer):
    with pytest.raises(ValueError, match="cannot infer the markers"):
        infer_markers(tokenizer, tokenizer("plain text")["input_ids"])
    get_chat_template(tokenizer, "gemma3")
    assert infer_markers(tokenizer) == ("<start_of_turn>user\n", "<start_of_turn>model\n")


def test_empty_markers_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="response_part must be a non-empty string"):
        ResponseMasker(tokenizer, "USER:", "")


def test_double_bos_is_reported(tokenizer, tiny_llama, tmp_path):
    """SmolLM2's BOS is <|im_start|>; a text row that opens with two of them gets a warning."""
    get_chat_template(tokenizer, "chatml")
    texts = ["<|im_start|>" + tokenizer.apply_chat_template(c, tokenize=False) for c in chat_rows()]
    trainer = sft_trainer(tiny_llama, tokenizer, Dataset.from_dict({"text": texts}), tmp_path)
    with pytest.warns(UserWarning, match="starts with two BOS tokens"):
        train_on_responses_only(trainer)
