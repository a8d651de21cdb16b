"""Issue 13 items 4 and 5 on tiny models: the docs' inference cell (`model.generate(input_ids=inputs)`
with the BatchEncoding transformers 5 returns), `tokenizer._ollama_modelfile`, and saves that are
always safetensors. (The same inference cell on SmolLM2 is in tests/test_smollm2_docs_cells.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from velotune.chat_templates import get_chat_template
from velotune.export import save_pretrained_gguf

from tiny import export_shapes as tiny
from .conftest import lora

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _docs_inputs(tok):
    """The docs' cell, as transformers 5 runs it: a BatchEncoding, not a tensor."""
    inputs = tok.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    assert not isinstance(inputs, torch.Tensor) and "attention_mask" in inputs
    return inputs


@pytest.mark.parametrize("wrap", ["decoder", "peft"])
def test_generate_accepts_the_docs_batch_encoding(tok, wrap):
    model = tiny.model("llama").eval()
    if wrap == "peft":
        model = lora(model)
    inputs = _docs_inputs(tok)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    for call in (lambda: model.generate(input_ids=inputs, max_new_tokens=6, do_sample=False),
                 lambda: model.generate(inputs, max_new_tokens=6, do_sample=False),
                 lambda: model.generate(inputs=inputs, max_new_tokens=6, do_sample=False)):
        assert torch.equal(call(), expected)


def test_generate_uses_the_encodings_attention_mask(tok):
    """A left-padded batch: the mapping's attention mask must reach generate, so the padded row
    generates exactly what it generates alone."""
    model = tiny.model("llama").eval()
    tok.padding_side = "left"
    try:
        batch = tok.apply_chat_template([QUESTION, [{"role": "user", "content": "Hi"}]], tokenize=True,
                                        add_generation_prompt=True, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    assert (batch["attention_mask"] == 0).any()
    together = model.generate(input_ids=batch, max_new_tokens=5, do_sample=False)
    alone = model.generate(**_docs_inputs_for(tok, [{"role": "user", "content": "Hi"}]), max_new_tokens=5,
                           do_sample=False)
    assert torch.equal(together[1, -5:], alone[0, -5:])


def _docs_inputs_for(tok, messages):
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")


def test_generate_refuses_ambiguous_or_untensored_mappings(tok):
    model = tiny.model("llama").eval()
    inputs = _docs_inputs(tok)
    with pytest.raises(ValueError, match="'attention_mask' twice"):
        model.generate(input_ids=inputs, attention_mask=torch.zeros_like(inputs["attention_mask"]), max_new_tokens=2)
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        model.generate(input_ids=tok("hello"), max_new_tokens=2)
    with pytest.raises(ValueError, match="without 'input_ids'"):
        model.generate(input_ids={"attention_mask": inputs["attention_mask"]}, max_new_tokens=2)


def test_ollama_modelfile_after_get_chat_template_and_after_the_gguf_export(tmp_path):
    tok = get_chat_template(tiny.tokenizer(), "chatml")
    text = tok._ollama_modelfile
    assert text.startswith("FROM {__FILE_LOCATION__}\nTEMPLATE \"\"\"") and 'PARAMETER stop "<|im_end|>"' in text
    [path] = save_pretrained_gguf(tiny.model("llama"), tmp_path / "out", tok, quantization_method="f16",
                                  verify=False)
    written = (tmp_path / "out" / "Modelfile").read_text()
    assert tok._ollama_modelfile == written and written.startswith(f"FROM ./{path.name}\n")
    assert text.split("\n", 1)[1] == written.split("\n", 1)[1]  # same TEMPLATE/stops, now FROM the file


def test_ollama_modelfile_follows_the_template():
    tok = get_chat_template(tiny.tokenizer(), "chatml")
    assert "<|im_start|>" in tok._ollama_modelfile
    get_chat_template(tok, "llama-3")
    assert "<|start_header_id|>" in tok._ollama_modelfile and "<|im_start|>" not in tok._ollama_modelfile
    # A custom (template, eos) pair has no Ollama form: a stale Modelfile must not stay behind.
    get_chat_template(tok, ("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", "eos_token"))
    assert not hasattr(tok, "_ollama_modelfile")


@pytest.mark.parametrize("safe", [None, False, True])
def test_adapters_and_models_are_always_saved_as_safetensors(tmp_path, safe, caplog):
    model = tiny.model("llama")
    with caplog.at_level(logging.WARNING, logger="velotune"):
        model.save_pretrained(tmp_path / "model", safe_serialization=safe)
        lora(model).save_pretrained(tmp_path / "adapter", safe_serialization=safe)
    files = {p.name for p in (tmp_path / "model").iterdir()} | {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"model.safetensors", "adapter_model.safetensors"} <= files
    assert not any(name.endswith(".bin") for name in files)
    notices = [r for r in caplog.records if "is saved as safetensors" in r.getMessage()]
    assert len(notices) == (2 if safe is False else 0)  # one per call that asked for .bin
