"""Chat template records: one typed description of a chat format, from which both the Jinja
template (Hugging Face tokenizers) and the Go template (Ollama `Modelfile`) are generated.

Why generate instead of hand-writing two templates per format: the most common failure after
export is a model that never stops because the Ollama template disagrees with the one used in
training. Deriving both from the same `TurnFormat` makes them agree by construction.

Token placeholders inside format strings:
  "{bos}"  the tokenizer's BOS string (`bos_token` in Jinja; dropped in Go, since llama.cpp adds
           BOS itself from the GGUF metadata),
  "{eos}"  the tokenizer's EOS string (`eos_token` in Jinja; filled in when the Go template is
           asked for, because Go templates have no such variable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

NAME_TAG = "{#- velotune:"  # Jinja comment that names the record; renders to nothing


@dataclass(frozen=True)
class TurnFormat:
    """The text around each message, per role.

    `system=None` means the format has no system turn: a system message is folded into the
    first user message with `fold` (Gemma, Mistral, Llama 2 do this).
    """

    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None = None
    fold: str = "{system}\n\n{user}"
    begin: str = ""  # emitted once before everything, e.g. "{bos}"
    generation_prompt: str | None = None  # defaults to the assistant prefix
    always_system: bool = False  # render the system turn even when there is no system text

    @property
    def gen_prompt(self) -> str:
        return self.assistant[0] if self.generation_prompt is None else self.generation_prompt


@dataclass(frozen=True)
class ChatTemplate:
    """One registry entry.

    `stop_token` is a literal end-of-turn token the format writes (e.g. "<|im_end|>"); None when
    the format ends turns with the tokenizer's own EOS. `instruction_part`/`response_part` are the
    markers `train_on_responses_only` uses; `adds_bos` says whether the template itself writes BOS
    (so callers must tokenize with `add_special_tokens=False`).
    """

    name: str
    turns: TurnFormat
    instruction_part: str
    response_part: str
    stop_token: str | None = None
    extra_stops: tuple[str, ...] = ()
    default_system: str | None = None
    jinja_override: str | None = None  # hand-written Jinja where the format is not regular
    content_parts: bool = False  # content may be a list of {"type": "text", "text": ...}
    aliases: tuple[str, ...] = field(default=())

    @property
    def adds_bos(self) -> bool:
        return "{bos}" in self.turns.begin + self.turns.user[0]

    def stop_tokens(self, eos_token: str) -> tuple[str, ...]:
        """Strings that end generation; the Modelfile lists each as a `PARAMETER stop`."""
        first = self.stop_token if self.stop_token is not None else eos_token
        return tuple(dict.fromkeys((first, *self.extra_stops)))

    def with_system(self, system_message: str | None) -> ChatTemplate:
        return self if system_message is None else replace(self, default_system=system_message)

    # ------------------------------------------------------------------ Jinja
    def jinja(self, mapping: dict[str, str] | None = None, tagged: bool = True) -> str:
        """The Jinja template, optionally reading ShareGPT-style keys given by `mapping`.
        `tagged` prefixes the registry name as a comment (only for registry entries)."""
        body = self.jinja_override if self.jinja_override is not None else _jinja_body(self)
        body = body.replace("__DEFAULT_SYSTEM__", _jinja_default(self.default_system))
        tag = name_tag(self.name, self.default_system) if tagged else ""
        return tag + _jinja_mapping_prelude(mapping) + body

    def render(self, messages, *, bos_token="<s>", eos_token="</s>", add_generation_prompt=False,
               mapping=None, **kwargs) -> str:
        """Render with the same Jinja settings transformers uses (trim/lstrip blocks)."""
        return render_jinja(self.jinja(mapping, tagged=False), messages, bos_token=bos_token, eos_token=eos_token,
                            add_generation_prompt=add_generation_prompt, **kwargs)

    # --------------------------------------------------------------------- Go
    def ollama_template(self, eos_token: str) -> str:
        """The Go template for an Ollama `Modelfile` (TEMPLATE), with EOS spelled out."""
        return _go_template(self).replace("{eos}", eos_token).replace("{bos}", "")


def render_jinja(template: str, messages, *, bos_token="", eos_token="", add_generation_prompt=False,
                 **kwargs) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt, **kwargs)


def name_tag(name: str, default_system: str | None) -> str:
    """A Jinja comment recording which registry entry (and system prompt) made a template, so the
    exporters can rebuild the matching Ollama template from a saved tokenizer."""
    payload = json.dumps({"name": name, "system": default_system}).replace("#", "\\u0023")
    return f"{NAME_TAG}{payload} #}}"


def read_name_tag(jinja_text: str | None) -> tuple[str, str | None] | None:
    """(registry name, default system) recorded by `name_tag`, or None for foreign templates."""
    if not jinja_text or not jinja_text.startswith(NAME_TAG):
        return None
    info = json.loads(jinja_text[len(NAME_TAG):jinja_text.index(" #}")])
    return info["name"], info["system"]


# ---------------------------------------------------------------------------- Jinja generation
def _lit(text: str) -> str:
    """A Jinja expression for `text`, with {bos}/{eos} turned into the tokenizer variables."""
    parts: list[str] = []
    rest = text
    while rest:
        cut = min((i for i in (rest.find("{bos}"), rest.find("{eos}")) if i >= 0), default=-1)
        if cut < 0:
            parts.append(json.dumps(rest, ensure_ascii=False))
            break
        if cut:
            parts.append(json.dumps(rest[:cut], ensure_ascii=False))
        parts.append("bos_token" if rest[cut:cut + 5] == "{bos}" else "eos_token")
        rest = rest[cut + 5:]
    return " + ".join(parts) if parts else '""'


def _jinja_default(default_system: str | None) -> str:
    return "none" if default_system is None else json.dumps(default_system, ensure_ascii=False)


def _jinja_mapping_prelude(mapping: dict[str, str] | None) -> str:
    """Rebuild `messages` as role/content dicts from e.g. ShareGPT's from/value, human/gpt."""
    if not mapping:
        return ""
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    names = {mapping[r]: r for r in ("system", "user", "assistant") if r in mapping}
    return (
        "{%- set ns_map = namespace(out=[]) %}"
        f"{{%- set role_names = {json.dumps(names, ensure_ascii=False)} %}}"
        "{%- for m in messages %}"
        f"{{%- set r = m[{json.dumps(role_key)}] if {json.dumps(role_key)} in m else m['role'] %}}"
        f"{{%- set c = m[{json.dumps(content_key)}] if {json.dumps(content_key)} in m else m['content'] %}}"
        "{%- set ns_map.out = ns_map.out + [{'role': role_names.get(r, r), 'content': c}] %}"
        "{%- endfor %}"
        "{%- set messages = ns_map.out %}"
    )


_CONTENT_PARTS_MACRO = (
    "{%- macro text(c) %}{%- if c is string %}{{- c }}{%- else %}{%- for p in c %}"
    "{%- if p['type'] == 'text' %}{{- p['text'] }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
)


def _jinja_body(t: ChatTemplate) -> str:
    f = t.turns
    content = "text(message['content'])" if t.content_parts else "message['content']"
    system_text = "text(system)" if t.content_parts else "system"
    out = [_CONTENT_PARTS_MACRO if t.content_parts else ""]
    if f.begin:
        out.append(f"{{{{- {_lit(f.begin)} }}}}")
    out.append(
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set system = __DEFAULT_SYSTEM__ %}{%- set loop_messages = messages %}{%- endif %}"
    )
    if f.system is not None:
        cond = "true" if f.always_system else "system is not none"
        sys_val = "(system if system is not none else '')" if f.always_system else system_text
        out.append(f"{{%- if {cond} %}}{{{{- {_lit(f.system[0])} + {sys_val} + {_lit(f.system[1])} }}}}{{%- endif %}}")
    else:
        before, after = f.fold.split("{system}")[0], f.fold.split("{system}")[1].split("{user}")[0]
        folded = f"{_lit(before)} + {system_text} + {_lit(after)} + {content}"
        out.append("{%- set ns = namespace(folded=(system is none)) %}")
    out.append("{%- for message in loop_messages %}")
    out.append("{%- if message['role'] == 'user' %}")
    if f.system is None:
        out.append(
            f"{{%- if not ns.folded %}}{{{{- {_lit(f.user[0])} + {folded} + {_lit(f.user[1])} }}}}"
            "{%- set ns.folded = true %}"
            f"{{%- else %}}{{{{- {_lit(f.user[0])} + {content} + {_lit(f.user[1])} }}}}{{%- endif %}}"
        )
    else:
        out.append(f"{{{{- {_lit(f.user[0])} + {content} + {_lit(f.user[1])} }}}}")
    out.append("{%- elif message['role'] == 'assistant' %}")
    out.append(f"{{{{- {_lit(f.assistant[0])} + {content} + {_lit(f.assistant[1])} }}}}")
    if f.system is not None:
        out.append("{%- elif message['role'] == 'system' %}")
        out.append(f"{{{{- {_lit(f.system[0])} + {content} + {_lit(f.system[1])} }}}}")
    out.append("{%- else %}{{- raise_exception('" + t.name + " template: unsupported role ' + message['role']) }}")
    out.append("{%- endif %}{%- endfor %}")
    out.append(f"{{%- if add_generation_prompt %}}{{{{- {_lit(f.gen_prompt)} }}}}{{%- endif %}}")
    return "".join(out)


# ------------------------------------------------------------------------------- Go generation
def _go(text: str) -> str:
    """Literal text is written as-is in Go templates; only "{{" would need escaping."""
    if "{{" in text:
        raise ValueError(f"template text {text!r} contains '{{{{'")
    return text


def _go_template(t: ChatTemplate) -> str:
    """Ollama `.Messages` form; no whitespace-trimming actions, so literal newlines survive.

    Formats without a system turn keep the system text in `$sys` and fold it into the next
    user message, as the Jinja side does.
    """
    f = t.turns
    fold = f.system is None
    out = [_go(f.begin), '{{ $sys := "" }}']
    default = t.default_system if t.default_system is not None else ("" if f.always_system else None)
    if default is not None:
        out.append('{{ if or (eq (len .Messages) 0) (ne (index .Messages 0).Role "system") }}')
        out.append(f"{{{{ $sys = {json.dumps(default, ensure_ascii=False)} }}}}" if fold
                   else f"{_go(f.system[0])}{_go(default)}{_go(f.system[1])}")
        out.append("{{ end }}")
    out.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if fold:
        before, after = f.fold.split("{system}")[0], f.fold.split("{system}")[1].split("{user}")[0]
        out.append('{{ if eq .Role "system" }}{{ $sys = .Content }}')
        out.append('{{ else if eq .Role "user" }}' + _go(f.user[0])
                   + "{{ if $sys }}" + _go(before) + "{{ $sys }}" + _go(after) + '{{ $sys = "" }}{{ end }}'
                   + "{{ .Content }}" + _go(f.user[1]))
    else:
        out.append('{{ if eq .Role "system" }}' + _go(f.system[0]) + "{{ .Content }}" + _go(f.system[1]))
        out.append('{{ else if eq .Role "user" }}' + _go(f.user[0]) + "{{ .Content }}" + _go(f.user[1]))
    out.append('{{ else if eq .Role "assistant" }}' + _go(f.assistant[0]) + "{{ .Content }}"
               + "{{ if not $last }}" + _go(f.assistant[1]) + "{{ end }}")
    out.append("{{ end }}")
    out.append('{{ if and $last (ne .Role "assistant") }}' + _go(f.gen_prompt) + "{{ end }}")
    out.append("{{ end }}")
    return "".join(out)
