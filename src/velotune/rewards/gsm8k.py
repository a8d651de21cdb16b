"""The docs' GSM8K reward set ("GSM8K Reward Functions", after @willccbb's), for two answer formats.

`<reasoning>/<answer>` (REASONING_FORMAT, the docs' notebooks)::

    <reasoning>
    ...
    </reasoning>
    <answer>
    72
    </answer>

`<think>` (THINK_FORMAT, R1-style): `<think>\\n...\\n</think>\\n72`; an `<answer>` block after
`</think>` is read too.

Five functions per format, with the docs' names and scores: correctness 2.0 (the extracted answer
equals the `answer` column, which may be GSM8K's raw "... #### 72"), integer 0.5, soft format 0.5,
strict format 0.5, XML tag count up to 0.5. Two deliberate differences from the notebook's
regular expressions: the reasoning may span several lines (the notebook's pattern had no DOTALL,
so multi-line reasoning never scored), and the strict format's final newline is optional (a model
that stops at its end-of-turn token right after `</answer>` is well formed).
"""

from __future__ import annotations

import re

from .text import completion_texts, normalize_number

REASONING_FORMAT = "reasoning"
THINK_FORMAT = "think"
FORMATS = (REASONING_FORMAT, THINK_FORMAT)

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

THINK_SYSTEM_PROMPT = """Think first, then answer. Respond in the following format:
<think>
...
</think>
the final answer"""

_STRICT = {
    REASONING_FORMAT: re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", re.S),
    THINK_FORMAT: re.compile(r"^<think>\n.*?\n</think>\n\S.*$", re.S),
}
_SOFT = {
    REASONING_FORMAT: re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.S),
    THINK_FORMAT: re.compile(r"\s*<think>.*?</think>\s*\S", re.S),
}


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose {REASONING_FORMAT!r} (<reasoning>/<answer>) or {THINK_FORMAT!r}")
    return fmt


def extract_xml_answer(text: str) -> str:
    """The text inside the last `<answer>...</answer>` (to the end when unclosed); the whole text,
    stripped, when there is no `<answer>` tag (as the docs' function does)."""
    if "<answer>" not in text:
        return text.strip()
    return text.rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()


def extract_answer(text: str, fmt: str = REASONING_FORMAT) -> str:
    """The final answer of a completion in `fmt`: the `<answer>` block, or for `think` what follows `</think>`."""
    if _check_format(fmt) == THINK_FORMAT:
        after = text.rsplit("</think>", 1)[1] if "</think>" in text else text
        return extract_xml_answer(after)
    return extract_xml_answer(text)


def extract_hash_answer(text: str) -> str | None:
    """GSM8K's answer column ends with '#### 72': the part after '####', or None without one."""
    if text is None or "####" not in text:
        return None
    return text.split("####", 1)[1].strip()


def _reference(answer) -> str:
    answer = str(answer)
    hashed = extract_hash_answer(answer)
    return (hashed if hashed is not None else answer).strip()


def _delimited(text: str, fmt: str) -> bool:
    """Whether the completion marks its answer (an `<answer>` tag, or `</think>` for the think format)."""
    return "<answer>" in text or (fmt == THINK_FORMAT and "</think>" in text)


def _matches(extracted: str, reference: str, delimited: bool) -> bool:
    """Exact match; or, for an answer the completion marked as such, the same number when it holds exactly
    one number ('72.0', '$72'). An unmarked completion ('Each gets 9 apples.') must match exactly, as in the
    docs' function: otherwise correctness would pay for skipping the format."""
    if extracted == reference:
        return True
    if not delimited:
        return False
    numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", extracted)
    if len(numbers) != 1:
        return False
    mine, theirs = normalize_number(extracted), normalize_number(reference)
    return mine is not None and mine == theirs


def _xml_count(text: str, fmt: str) -> float:
    if fmt == THINK_FORMAT:
        score = 0.25 * (text.count("<think>\n") == 1) + 0.25 * (text.count("\n</think>\n") == 1)
        return score
    score = 0.0
    score += 0.125 * (text.count("<reasoning>\n") == 1)
    score += 0.125 * (text.count("\n</reasoning>\n") == 1)
    score += 0.125 * (text.count("\n<answer>\n") == 1)
    if text.count("\n</answer>") == 1:
        score += 0.125
        trailing = text.split("\n</answer>")[-1]
        score -= 0.001 * max(len(trailing) - 1, 0)  # text after the closing tag (its newline is free) costs
    return score


def _named(function, name: str):
    function.__name__ = function.__qualname__ = name
    return function


def gsm8k_rewards(fmt: str = REASONING_FORMAT) -> list:
    """The five GSM8K reward functions for `fmt` ("reasoning" or "think"), in the docs' order:
    [xmlcount, soft_format, strict_format, int, correctness]. Their names (prefixed `think_` for
    the think format) are what the trainer logs under `rewards/<name>/mean`."""
    _check_format(fmt)
    prefix = "" if fmt == REASONING_FORMAT else "think_"

    def correctness(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
        if answer is None:
            raise ValueError(f"{prefix}correctness_reward_func needs the dataset's `answer` column (none was passed)")
        texts = completion_texts(completions)
        return [2.0 if _matches(extract_answer(t, fmt), _reference(a), _delimited(t, fmt)) else 0.0
                for t, a in zip(texts, answer)]

    def integer(prompts=None, completions=None, **kwargs) -> list[float]:
        return [0.5 if extract_answer(t, fmt).isdigit() else 0.0 for t in completion_texts(completions)]

    def soft(prompts=None, completions=None, **kwargs) -> list[float]:
        return [0.5 if _SOFT[fmt].match(t) else 0.0 for t in completion_texts(completions)]

    def strict(prompts=None, completions=None, **kwargs) -> list[float]:
        return [0.5 if _STRICT[fmt].match(t) else 0.0 for t in completion_texts(completions)]

    def xmlcount(prompts=None, completions=None, **kwargs) -> list[float]:
        return [_xml_count(t, fmt) for t in completion_texts(completions)]

    return [_named(xmlcount, f"{prefix}xmlcount_reward_func"), _named(soft, f"{prefix}soft_format_reward_func"),
            _named(strict, f"{prefix}strict_format_reward_func"), _named(integer, f"{prefix}int_reward_func"),
            _named(correctness, f"{prefix}correctness_reward_func")]


(xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func, int_reward_func,
 correctness_reward_func) = gsm8k_rewards(REASONING_FORMAT)
