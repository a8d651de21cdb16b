"""`apply_chat_template(dataset, tokenizer, chat_template, default_system_message)`: the Unsloth API's
"Customizable Chat Templates", where a plain-text template marks the prompt with `{INPUT}`, the
answer with `{OUTPUT}` and, optionally, a system prompt with `{SYSTEM}`.

The text template is turned into a `TurnFormat` (so multi-turn conversations repeat the
instruction/response part once per turn, EOS after each answer) and then into Jinja; the
tokenizer gets that Jinja as its chat template, so inference prompts match training text.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sharegpt import _first, _role_names, DEFAULT_ALIASES
from .templates import ChatTemplate, TurnFormat, render_jinja


@dataclass(frozen=True)
class TextTemplate:
    """A parsed `{INPUT}`/`{OUTPUT}` template: the record plus the masking markers it implies."""

    record: ChatTemplate
    instruction_part: str
    response_part: str


def _count_once(template: str, field: str, required: bool) -> bool:
    n = template.count(field)
    if n > 1 or (required and n == 0):
        raise ValueError(f"chat_template must contain {field} {'exactly' if required else 'at most'} once "
                         f"(found {n}): {template!r}")
    return n == 1


def parse_text_template(template: str, eos_token: str, bos_token: str | None = None) -> TextTemplate:
    """Split `template` into preamble/system part, per-turn prefix, response prefix and turn end."""
    _count_once(template, "{INPUT}", True)
    _count_once(template, "{OUTPUT}", True)
    has_system = _count_once(template, "{SYSTEM}", False)
    before, after_input = template.split("{INPUT}")
    if "{OUTPUT}" not in after_input:
        raise ValueError("chat_template: {OUTPUT} must come after {INPUT}")
    middle, end = after_input.split("{OUTPUT}")
    if "{SYSTEM}" in after_input:
        raise ValueError("chat_template: {SYSTEM} must come before {INPUT}")

    begin = ""
    if bos_token and before.startswith(bos_token):
        begin, before = "{bos}", before[len(bos_token):]
    if has_system:
        sys_open, after_sys = before.split("{SYSTEM}")
        core = end.rstrip()
        if core and after_sys.startswith(core):  # the system turn closes like an answer does
            cut = len(core)
        else:  # otherwise it closes at the first line break
            cut = after_sys.find("\n")
            cut = 0 if cut < 0 else cut
        while cut < len(after_sys) and after_sys[cut] == "\n":
            cut += 1
        system = (sys_open, after_sys[:cut])
        turn_prefix = after_sys[cut:]
    else:
        system = None
        stripped = before.rstrip()
        cut = stripped.rfind("\n\n")
        if cut >= 0:
            begin, turn_prefix = begin + before[:cut + 2], before[cut + 2:]
        else:
            turn_prefix = before
    # The prompt closes the way the answer does (e.g. "<|im_end|>\n"); whatever line breaks follow
    # that close inside the template also separate one turn from the next.
    core = end.rstrip()
    response_part = middle[len(core):] if core and middle.startswith(core) else middle
    sep = response_part[:len(response_part) - len(response_part.lstrip("\n"))]
    response_part = response_part.lstrip()
    if end.endswith("\n") or turn_prefix.startswith("\n"):
        sep = ""
    closing = end + ("" if eos_token in end else "{eos}") + sep
    turns = TurnFormat(begin=begin, system=system, always_system=has_system,
                       user=(turn_prefix, ""), assistant=(middle, closing.replace(eos_token, "{eos}")))
    record = ChatTemplate("custom", turns, instruction_part=turn_prefix.strip(), response_part=response_part)
    return TextTemplate(record, record.instruction_part, record.response_part)


def apply_chat_template(dataset, tokenizer, chat_template: str, default_system_message: str | None = None,
                        column: str | None = None, output_column: str = "text"):
    """Render each conversation with the text template into a `text` column, and set the
    equivalent Jinja template on `tokenizer` for inference."""
    if tokenizer.eos_token is None:
        raise ValueError("apply_chat_template: the tokenizer has no EOS token to end each answer with")
    parsed = parse_text_template(chat_template, tokenizer.eos_token, tokenizer.bos_token)
    if default_system_message is not None and "{SYSTEM}" not in chat_template:
        raise ValueError("default_system_message was given but chat_template has no {SYSTEM} field")
    record = parsed.record.with_system(default_system_message)
    jinja = record.jinja(tagged=False)
    if column is None:
        column = next((c for c in ("conversations", "messages") if c in dataset.column_names), None)
        if column is None:
            raise KeyError(f"apply_chat_template: no 'conversations' or 'messages' column in {dataset.column_names}")
    names = _role_names(*DEFAULT_ALIASES.values())

    def render(batch, indices):
        texts = []
        for idx, convo in zip(indices, batch[column]):
            messages = []
            for msg in convo:
                role = _first(msg, "role", "from")
                if role is None or str(role).lower() not in names:
                    raise ValueError(f"apply_chat_template: row {idx}: unknown role {role!r}")
                messages.append({"role": names[str(role).lower()], "content": _first(msg, "content", "value")})
            texts.append(render_jinja(jinja, messages, bos_token=tokenizer.bos_token or "",
                                      eos_token=tokenizer.eos_token))
        return {output_column: texts}

    out = dataset.map(render, batched=True, with_indices=True, desc="Applying chat template")
    tokenizer.chat_template = jinja
    return out
