"""Every registry template renders a system prompt plus three exchanges exactly like a reference
written out by hand here, both with our renderer and through the real tokenizer."""

import re
import warnings

import pytest

from conftest import A1, A2, A3, SYSTEM, U1, U2, U3
from velotune.chat_templates import CHAT_TEMPLATES, get_chat_template, get_template_record
from velotune.data.registry import (ALPACA_DEFAULT_SYSTEM, LLAMA31_DATE_HEADER, QWEN25_DEFAULT_SYSTEM,
                                    UNSLOTH_DEFAULT_SYSTEM, VICUNA_DEFAULT_SYSTEM, VICUNA_OLD_DEFAULT_SYSTEM)

S = SYSTEM
CHATML = (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}"
          f"<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n"
          f"<|im_start|>user\n{U3}<|im_end|>\n<|im_start|>assistant\n{A3}<|im_end|>\n")
LLAMA3_TURNS = (f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|><|start_header_id|>assistant"
                f"<|end_header_id|>\n\n{A1}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{U2}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{U3}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{A3}<|eot_id|>")
GEMMA = (f"BOS<start_of_turn>user\n{S}\n\n{U1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
         f"<start_of_turn>user\n{U2}<end_of_turn>\n<start_of_turn>model\n{A2}<end_of_turn>\n"
         f"<start_of_turn>user\n{U3}<end_of_turn>\n<start_of_turn>model\n{A3}<end_of_turn>\n")

# A system prompt and three exchanges, written out by hand. BOS / EOS stand for the tokenizer's own strings.
REFERENCE = {
    "chatml": CHATML,
    "qwen-2.5": CHATML,
    "qwen3": CHATML,
    "zephyr": (f"<|system|>\n{S}EOS\n<|user|>\n{U1}EOS\n<|assistant|>\n{A1}EOS\n<|user|>\n{U2}EOS\n<|assistant|>\n{A2}EOS\n"
               f"<|user|>\n{U3}EOS\n<|assistant|>\n{A3}EOS\n"),
    "mistral": f"BOS[INST] {S}\n\n{U1} [/INST]{A1}EOS[INST] {U2} [/INST]{A2}EOS[INST] {U3} [/INST]{A3}EOS",
    "llama": (f"BOS[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U1} [/INST] {A1} EOSBOS[INST] {U2} [/INST] {A2} EOS"
              f"BOS[INST] {U3} [/INST] {A3} EOS"),
    "llama-3": f"BOS<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>" + LLAMA3_TURNS,
    "llama-3.1": f"BOS<|start_header_id|>system<|end_header_id|>\n\n{LLAMA31_DATE_HEADER}{S}<|eot_id|>" + LLAMA3_TURNS,
    "alpaca": (f"{S}\n\n### Instruction:\n{U1}\n\n### Response:\n{A1}EOS\n\n### Instruction:\n{U2}\n\n### Response:\n{A2}EOS\n\n"
               f"### Instruction:\n{U3}\n\n### Response:\n{A3}EOS\n\n"),
    "vicuna": f"{S} USER: {U1} ASSISTANT: {A1}EOSUSER: {U2} ASSISTANT: {A2}EOSUSER: {U3} ASSISTANT: {A3}EOS",
    "vicuna_old": (f"{S}\n### Human: {U1}\n### Assistant: {A1}EOS\n### Human: {U2}\n### Assistant: {A2}EOS\n"
                   f"### Human: {U3}\n### Assistant: {A3}EOS\n"),
    "unsloth": (f"BOS{S}\n>>> User: {U1}\n>>> Assistant: {A1}EOS\n>>> User: {U2}\n>>> Assistant: {A2}EOS\n"
                f">>> User: {U3}\n>>> Assistant: {A3}EOS\n"),
    "gemma": GEMMA,
    "gemma2": GEMMA,
    "gemma3": GEMMA,
    "phi-3": (f"<|system|>\n{S}<|end|>\n<|user|>\n{U1}<|end|>\n<|assistant|>\n{A1}<|end|>\n<|user|>\n{U2}<|end|>\n"
              f"<|assistant|>\n{A2}<|end|>\n<|user|>\n{U3}<|end|>\n<|assistant|>\n{A3}<|end|>\n"),
    "phi-4": (f"<|im_start|>system<|im_sep|>{S}<|im_end|><|im_start|>user<|im_sep|>{U1}<|im_end|><|im_start|>assistant"
              f"<|im_sep|>{A1}<|im_end|><|im_start|>user<|im_sep|>{U2}<|im_end|><|im_start|>assistant<|im_sep|>{A2}<|im_end|>"
              f"<|im_start|>user<|im_sep|>{U3}<|im_end|><|im_start|>assistant<|im_sep|>{A3}<|im_end|>"),
    "deepseek-r1": (f"BOS{S}<｜User｜>{U1}<｜Assistant｜>{A1}<｜end▁of▁sentence｜><｜User｜>{U2}<｜Assistant｜>{A2}"
                    f"<｜end▁of▁sentence｜><｜User｜>{U3}<｜Assistant｜>{A3}<｜end▁of▁sentence｜>"),
}

# What the format writes when the conversation has no system message.
NO_SYSTEM_OPENING = {
    "qwen-2.5": f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n",
    "alpaca": f"{ALPACA_DEFAULT_SYSTEM}\n\n### Instruction:\n",
    "vicuna": f"{VICUNA_DEFAULT_SYSTEM} USER: ",
    "vicuna_old": f"{VICUNA_OLD_DEFAULT_SYSTEM}\n### Human: ",
    "unsloth": f"BOS{UNSLOTH_DEFAULT_SYSTEM}\n>>> User: ",
    "llama-3.1": f"BOS<|start_header_id|>system<|end_header_id|>\n\n{LLAMA31_DATE_HEADER}<|eot_id|><|start_header_id|>user",
    "chatml": "<|im_start|>user\n",
    "gemma": "BOS<start_of_turn>user\n" + U1,
    "llama": f"BOS[INST] {U1} [/INST]",
}

GENERATION_PROMPT_END = {
    "chatml": f"{U2}<|im_end|>\n<|im_start|>assistant\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": f"[INST] {U2} [/INST]", "llama": f"[INST] {U2} [/INST]", "alpaca": f"{U2}\n\n### Response:\n",
    "vicuna": f"USER: {U2} ASSISTANT:", "vicuna_old": f"### Human: {U2}\n### Assistant:",
    "unsloth": ">>> Assistant: ", "gemma3": "<start_of_turn>model\n", "phi-3": "<|assistant|>\n",
    "phi-4": "<|im_start|>assistant<|im_sep|>", "deepseek-r1": f"<｜User｜>{U2}<｜Assistant｜>",
    "zephyr": "<|assistant|>\n", "qwen3": "<|im_start|>assistant\n",
}


def expected(name, text=None, bos="<s>", eos="</s>"):
    return (REFERENCE[name] if text is None else text).replace("BOS", bos).replace("EOS", eos)


def test_registry_has_the_issue_names():
    assert set(REFERENCE) == set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_renders_reference(name, conversation):
    assert CHAT_TEMPLATES[name].render(conversation) == expected(name)


@pytest.mark.parametrize("name", sorted(NO_SYSTEM_OPENING))
def test_default_system_when_none_given(name, conversation):
    assert CHAT_TEMPLATES[name].render(conversation[1:]).startswith(expected(name, NO_SYSTEM_OPENING[name]))


@pytest.mark.parametrize("name", sorted(GENERATION_PROMPT_END))
def test_generation_prompt(name, conversation):
    out = CHAT_TEMPLATES[name].render(conversation[:4], add_generation_prompt=True)
    assert out.endswith(expected(name, GENERATION_PROMPT_END[name]))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_real_tokenizer_renders_reference(name, tokenizer, conversation):
    """Through transformers' own Jinja environment, with SmolLM2's BOS/EOS strings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stop tokens SmolLM2 lacks: not mapped here on purpose
        get_chat_template(tokenizer, chat_template=name, map_eos_token=False)
    out = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert out == expected(name, bos=tokenizer.bos_token, eos=tokenizer.eos_token)


def test_adds_bos_flag():
    assert {n for n, t in CHAT_TEMPLATES.items() if t.adds_bos} == {
        "mistral", "llama", "llama-3", "llama-3.1", "unsloth", "gemma", "gemma2", "gemma3", "deepseek-r1"}


def test_aliases_and_unknown_name():
    assert get_template_record("Llama3").name == "llama-3"
    assert get_template_record("vicuna-old").name == "vicuna_old"
    assert get_template_record("gemma-3").name == "gemma3"
    with pytest.raises(ValueError, match="Unknown chat template 'llama-9'.*chatml"):
        get_template_record("llama-9")


def test_qwen3_think_handling():
    t = CHAT_TEMPLATES["qwen3"]
    convo = [{"role": "user", "content": U1}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n" + A1},
             {"role": "user", "content": U2}, {"role": "assistant", "content": "<think>add again</think>" + A2}]
    assert t.render(convo) == (
        f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"  # history: answer only
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n</think>\n\n{A2}<|im_end|>\n")
    reasoning_field = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1, "reasoning_content": "r"}]
    assert t.render(reasoning_field).endswith(f"<think>\nr\n</think>\n\n{A1}<|im_end|>\n")
    prompt = t.render(convo[:1], add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_gemma3_content_parts():
    parts = [{"role": "user", "content": [{"type": "text", "text": U1}]}, {"role": "assistant", "content": A1}]
    assert CHAT_TEMPLATES["gemma3"].render(parts).startswith(f"<s><start_of_turn>user\n{U1}<end_of_turn>")


def test_unsupported_role_is_an_error(conversation):
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="unsupported role tool"):
        CHAT_TEMPLATES["chatml"].render(conversation + [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_ollama_template_is_well_formed(name):
    """Same turn text as the Jinja side, balanced actions, EOS spelled out, stop tokens listed."""
    record = CHAT_TEMPLATES[name]
    go = record.ollama_template("</s>")
    opens = len(re.findall(r"\{\{ (if|range) ", go))
    assert opens == go.count("{{ end }}")
    assert "{eos}" not in go and "{bos}" not in go and "{%" not in go
    assert ".Messages" in go and "{{ .Content }}" in go
    assert record.turns.assistant[0].replace("{eos}", "</s>") in go
    stops = record.stop_tokens("</s>")
    assert stops[0] == (record.stop_token or "</s>")
    assert all(stop in go for stop in stops[:1])


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    from ollama_go import build_renderer

    return build_renderer(str(tmp_path_factory.mktemp("go")))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_ollama_template_renders_like_jinja(name, conversation, go_renderer):
    """Go's text/template (Ollama's engine) renders exactly the Jinja text at inference: one and three
    user turns, the last awaiting an answer, with and without a system prompt. BOS is left to
    llama.cpp, so Jinja renders with an empty BOS."""
    from ollama_go import render_all

    record = CHAT_TEMPLATES[name]
    conversations = [conversation[:2], conversation[:6], conversation[1:2], conversation[1:6]]
    go = render_all(go_renderer, [(record.ollama_template("</s>"), c) for c in conversations])
    jinja = [record.render(c, bos_token="", eos_token="</s>", add_generation_prompt=True) for c in conversations]
    assert go == jinja
