"""Local data of the docs' dataset shapes (the hub is not reachable) and the tiny stand-in model."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from velotune import FastLanguageModel
from velotune.chat_templates import get_chat_template

# Rows of the docs' dataset shapes, written by the tests (the hub is not reachable).
ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, exercise, sleep enough."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi there!"}, {"from": "gpt", "value": "Hi how can I help?"},
                       {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "human", "value": "What's your name?"}, {"from": "gpt", "value": "I'm Daniel!"}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    {"conversations": [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome."}]},
]
RAW_TEXT = [{"text": "Pasta carbonara is a traditional Roman pasta dish."},
            {"text": "The sauce is made by mixing raw eggs with grated Pecorino Romano."},
            {"text": "The hot pasta is then tossed with crispy guanciale."},
            {"text": "Authentic carbonara never contains cream or garlic."}]


def alpaca_text(tokenizer) -> list[dict]:
    """The Alpaca rows formatted with the docs' Alpaca prompt into a `text` column (the notebook's
    `formatting_prompts_func`), ending with EOS."""
    prompt = "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
    return [{"text": prompt.format(r["instruction"], r["input"], r["output"]) + tokenizer.eos_token} for r in ALPACA]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def tiny_model(folder, **peft):
    """(model, tokenizer) as the notebook has them before the snippet: loaded, LoRA added when `peft`."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, load_in_4bit=False,
                                                         device_map="cpu")
    if peft:
        model = FastLanguageModel.get_peft_model(model, **peft)
    return model, tokenizer


def small_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained on the rows above, with ChatML like SmolLM2's: the tiny
    model's embedding stays small, so exports take seconds, not a minute."""
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in ALPACA]
    texts += [m["value"] for row in SHAREGPT for m in row["conversations"]] + [r["text"] for r in RAW_TEXT]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    return get_chat_template(fast, "chatml")
