"""Modelfiles: TEMPLATE from the registry record of the tokenizer's template, found by name tag or
by rendering like a registry format; a clear refusal when no Ollama template can be generated.
(Go template == Jinja rendering for every registry template is tested in tests/data.)"""

from __future__ import annotations

import pytest

from velotune.export.ollama import matching_record, modelfile_text, ollama_template, write_modelfile

from tiny import export_shapes as tiny

# Like SmolLM2's own template: ChatML with a built-in default system prompt, not written by velotune.
FOREIGN_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_foreign_template_is_matched_to_its_registry_format_with_its_system_prompt():
    tok = tiny.tokenizer()
    tok.chat_template = FOREIGN_CHATML
    record = matching_record(tok)
    assert record is not None and record.name == "chatml"
    info = ollama_template(tok)
    assert info.system == "You are a tiny test model." and info.stop_tokens == ("<|im_end|>",)
    text = modelfile_text("m.gguf", info)
    assert 'SYSTEM """You are a tiny test model."""' in text and "<|im_start|>assistant" in text


def test_template_no_registry_format_renders_like_is_refused_clearly(tmp_path):
    tok = tiny.tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="no Ollama template can be generated"):
        ollama_template(tok)
    gguf_file = tmp_path / "model-Q8_0.gguf"
    path = write_modelfile(tmp_path / "Modelfile", gguf_file, tok, strict=False)
    text = path.read_text()
    assert text.startswith("# no Ollama template can be generated") and "TEMPLATE" not in text.split("\n", 1)[1]
    assert "FROM ./model-Q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    with pytest.raises(ValueError, match="no Ollama template"):
        write_modelfile(tmp_path / "Modelfile2", gguf_file, tok, strict=True)


def test_tokenizer_without_template_is_refused():
    tok = tiny.tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ollama_template(tok)


@pytest.mark.parametrize("name", ["llama-3.1", "gemma", "mistral", "phi-3", "alpaca"])
def test_registry_templates_give_their_own_stops(name):
    from velotune.chat_templates import get_chat_template

    tok = get_chat_template(tiny.tokenizer(), name)
    info = ollama_template(tok)
    assert info.stop_tokens and all(info.stop_tokens)
    assert modelfile_text("m.gguf", info).count("PARAMETER stop") == len(info.stop_tokens)
