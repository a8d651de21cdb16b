"""The chat template registry: every format `get_chat_template` knows by name.

Formats are written from the model families' published prompt formats. Where a format ends turns
with the tokenizer's EOS (Llama 2, Mistral, Zephyr, Alpaca, Vicuna, the docs' "unsloth" format) the
template uses the `eos_token` variable, so it is right for any tokenizer; where it writes a literal
end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, ...) that token is `stop_token`, and
`get_chat_template(map_eos_token=True)` maps it onto the tokenizer's EOS when the vocabulary lacks it.
"""

from __future__ import annotations

from .templates import ChatTemplate, TurnFormat

_CHATML = TurnFormat(
    system=("<|im_start|>system\n", "<|im_end|>\n"),
    user=("<|im_start|>user\n", "<|im_end|>\n"),
    assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
)
_CHATML_MARKERS = dict(instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")

_LLAMA3 = TurnFormat(
    begin="{bos}",
    system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
)
_LLAMA3_MARKERS = dict(instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
                       response_part="<|start_header_id|>assistant<|end_header_id|>\n\n")
# Llama 3.1's format always opens with a system turn carrying these two dates.
LLAMA31_DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

_GEMMA = TurnFormat(
    begin="{bos}",
    user=("<start_of_turn>user\n", "<end_of_turn>\n"),
    assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
)
_GEMMA_MARKERS = dict(instruction_part="<start_of_turn>user\n", response_part="<start_of_turn>model\n")

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_DEFAULT_SYSTEM = ("Below is an instruction that describes a task. "
                         "Write a response that appropriately completes the request.")
VICUNA_DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VICUNA_OLD_DEFAULT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
UNSLOTH_DEFAULT_SYSTEM = "You are a helpful assistant to the user"

# Qwen3: reasoning (`<think>...</think>`, or a `reasoning_content` field) is kept only for assistant
# turns after the last user message; earlier turns keep just their final answer, as Qwen3's own
# format does. `enable_thinking=False` with a generation prompt writes an empty think block.
_QWEN3_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = __DEFAULT_SYSTEM__ %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if system is not none %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' or message['role'] == 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is string %}{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- raise_exception('qwen3 template: unsupported role ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

_ENTRIES = [
    ChatTemplate("chatml", _CHATML, stop_token="<|im_end|>", **_CHATML_MARKERS),
    ChatTemplate(
        "zephyr",
        TurnFormat(system=("<|system|>\n", "{eos}\n"), user=("<|user|>\n", "{eos}\n"),
                   assistant=("<|assistant|>\n", "{eos}\n")),
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
    ),
    ChatTemplate(
        "mistral",
        TurnFormat(begin="{bos}", user=("[INST] ", " [/INST]"), assistant=("", "{eos}"),
                   generation_prompt=""),
        instruction_part="[INST]", response_part="[/INST]",
    ),
    ChatTemplate(
        "llama",
        TurnFormat(user=("{bos}[INST] ", " [/INST]"), assistant=(" ", " {eos}"),
                   fold="<<SYS>>\n{system}\n<</SYS>>\n\n{user}", generation_prompt=""),
        instruction_part="[INST]", response_part="[/INST]", aliases=("llama-2", "llama2"),
    ),
    ChatTemplate("llama-3", _LLAMA3, stop_token="<|eot_id|>", aliases=("llama3",), **_LLAMA3_MARKERS),
    ChatTemplate(
        "llama-3.1",
        TurnFormat(begin="{bos}", always_system=True,
                   system=("<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA31_DATE_HEADER, "<|eot_id|>"),
                   user=_LLAMA3.user, assistant=_LLAMA3.assistant),
        stop_token="<|eot_id|>", extra_stops=("<|eom_id|>",),
        aliases=("llama-31", "llama3.1", "llama-3.2", "llama-3.3"), **_LLAMA3_MARKERS,
    ),
    ChatTemplate(
        "alpaca",
        TurnFormat(system=("", "\n\n"), user=("### Instruction:\n", "\n\n"),
                   assistant=("### Response:\n", "{eos}\n\n")),
        instruction_part="### Instruction:\n", response_part="### Response:\n",
        default_system=ALPACA_DEFAULT_SYSTEM,
    ),
    ChatTemplate(
        "vicuna",
        TurnFormat(system=("", " "), user=("USER: ", " "), assistant=("ASSISTANT: ", "{eos}"),
                   generation_prompt="ASSISTANT:"),
        instruction_part="USER:", response_part="ASSISTANT:", default_system=VICUNA_DEFAULT_SYSTEM,
    ),
    ChatTemplate(
        "vicuna_old",
        TurnFormat(system=("", "\n"), user=("### Human: ", "\n"), assistant=("### Assistant: ", "{eos}\n"),
                   generation_prompt="### Assistant:"),
        instruction_part="### Human:", response_part="### Assistant:", default_system=VICUNA_OLD_DEFAULT_SYSTEM,
    ),
    ChatTemplate(
        "unsloth",
        TurnFormat(begin="{bos}", system=("", "\n"), user=(">>> User: ", "\n"),
                   assistant=(">>> Assistant: ", "{eos}\n")),
        instruction_part=">>> User: ", response_part=">>> Assistant: ", default_system=UNSLOTH_DEFAULT_SYSTEM,
    ),
    ChatTemplate("gemma", _GEMMA, stop_token="<end_of_turn>", **_GEMMA_MARKERS),
    ChatTemplate("gemma2", _GEMMA, stop_token="<end_of_turn>", aliases=("gemma-2",), **_GEMMA_MARKERS),
    ChatTemplate("gemma3", _GEMMA, stop_token="<end_of_turn>", content_parts=True, aliases=("gemma-3",),
                 **_GEMMA_MARKERS),
    ChatTemplate(
        "phi-3",
        TurnFormat(system=("<|system|>\n", "<|end|>\n"), user=("<|user|>\n", "<|end|>\n"),
                   assistant=("<|assistant|>\n", "<|end|>\n")),
        stop_token="<|end|>", extra_stops=("<|endoftext|>",), aliases=("phi3", "phi-3.5"),
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
    ),
    ChatTemplate(
        "phi-4",
        TurnFormat(system=("<|im_start|>system<|im_sep|>", "<|im_end|>"),
                   user=("<|im_start|>user<|im_sep|>", "<|im_end|>"),
                   assistant=("<|im_start|>assistant<|im_sep|>", "<|im_end|>")),
        stop_token="<|im_end|>", aliases=("phi4",),
        instruction_part="<|im_start|>user<|im_sep|>", response_part="<|im_start|>assistant<|im_sep|>",
    ),
    ChatTemplate("qwen-2.5", _CHATML, stop_token="<|im_end|>", extra_stops=("<|endoftext|>",),
                 default_system=QWEN25_DEFAULT_SYSTEM, aliases=("qwen2.5", "qwen-25", "qwen25"),
                 **_CHATML_MARKERS),
    ChatTemplate("qwen3", _CHATML, stop_token="<|im_end|>", extra_stops=("<|endoftext|>",),
                 jinja_override=_QWEN3_JINJA, aliases=("qwen-3",), **_CHATML_MARKERS),
    ChatTemplate(
        "deepseek-r1",
        TurnFormat(begin="{bos}", system=("", ""), user=("<｜User｜>", ""),
                   assistant=("<｜Assistant｜>", "<｜end▁of▁sentence｜>")),
        stop_token="<｜end▁of▁sentence｜>", aliases=("deepseek_r1", "deepseek-r1-distill"),
        instruction_part="<｜User｜>", response_part="<｜Assistant｜>",
    ),
]

CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _ENTRIES}
_BY_ALIAS = {alias: t for t in _ENTRIES for alias in (t.name, *t.aliases)}


def get_template_record(name: str) -> ChatTemplate:
    """Look a format up by name or alias (case-insensitive, `_`/`-` interchangeable)."""
    key = name.strip().lower()
    for candidate in (key, key.replace("_", "-"), key.replace("-", "_")):
        if candidate in _BY_ALIAS:
            return _BY_ALIAS[candidate]
    raise ValueError(f"Unknown chat template {name!r}. Known: {', '.join(sorted(CHAT_TEMPLATES))}")
