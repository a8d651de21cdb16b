"""The docs' chat-template snippets ("Chat Templates", "Datasets 101") with SmolLM2's tokenizer and
local rows of the docs' ShareGPT shape."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from velotune.chat_templates import standardize_sharegpt

from .local import SHAREGPT, write_jsonl
from .snippets import VELOTUNE, Sub, find_block, run_snippet, substitute

# What gitbook's rendering turned into <div> tags: the template as unsloth's docs source has it.
UPSTREAM_TEMPLATE = '''    "{% for message in messages %}"\\
        "{% if message['role'] == 'user' %}"\\
            "{{ '>>> User: ' + message['content'] + '\\n' }}"\\
        "{% elif message['role'] == 'assistant' %}"\\
            "{{ '>>> Assistant: ' + message['content'] + eos_token + '\\n' }}"\\
        "{% endif %}"\\
    "{% endfor %}"\\
    "{% if add_generation_prompt %}"\\
        "{{ '>>> Assistant: ' }}"\\
    "{% endif %}"'''


@pytest.fixture
def tokenizer(smollm2):
    """SmolLM2's tokenizer; a copy, since get_chat_template sets the template in place."""
    return copy.deepcopy(smollm2[1])


def test_get_chat_template_sharegpt(tokenizer, tmp_path):
    block = find_block('chat_template = "chatml",')
    data = write_jsonl(tmp_path / "guanaco-sharegpt-style.jsonl", SHAREGPT)
    scope = run_snippet(block, [*VELOTUNE, Sub('load_dataset("philschmid/guanaco-sharegpt-style", split = "train")',
                                               f'load_dataset("json", data_files = {data!r}, split = "train")',
                                               "local rows of the same shape (conversations of from/value)")],
                        {"tokenizer": tokenizer})
    texts = scope["dataset"]["text"]
    assert len(texts) == len(SHAREGPT)
    assert texts[0].startswith("<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHi how can I help?")
    assert scope["tokenizer"].eos_token == "<|im_end|>"  # map_eos_token: turns end with EOS


def test_custom_chat_template(tokenizer):
    """A (template, eos_token) tuple. The page's template lost its Jinja tags to the site's rendering
    (`<div data-gb-custom-block ...>`, also a Python syntax error); the substitution restores them."""
    block = find_block("unsloth_template = \\")
    start = block.text.index('    "</div>"\\\n    "<div data-gb-custom-block data-tag="for">"')
    garbled = block.text[start:block.text.index("unsloth_eos_token")].rstrip("\n")
    scope = run_snippet(block, [Sub(garbled, UPSTREAM_TEMPLATE, "gitbook rendered the Jinja tags as <div>s")],
                        {"tokenizer": tokenizer, "get_chat_template": __import__(
                            "velotune.chat_templates", fromlist=["get_chat_template"]).get_chat_template})
    convo = SHAREGPT[0]["conversations"][:2]
    text = scope["tokenizer"].apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token
    assert text == (f"{tokenizer.bos_token or ''}You are a helpful assistant to the user\n>>> User: Hi there!\n"
                    f">>> Assistant: Hi how can I help?{eos}\n>>> Assistant: ")


def test_sharegpt_conversation_format(tokenizer):
    """"Datasets 101": one row of the conversational format (human/assistant turns), standardized and
    rendered with the model's chat template."""
    row = eval(substitute(find_block('"conversations": [\\').text, ()))  # noqa: S307 - the docs' literal
    dataset = standardize_sharegpt(Dataset.from_list([row]))
    messages = dataset[0]["conversations"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Can you help me make pasta carbonara?"
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\nWould you like the traditional Roman recipe" in text
