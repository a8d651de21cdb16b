"""The docs' reward-function examples as ready functions ("Reward Function Examples").

Example 1, simple arithmetic ("2 + 2" -> "4"): `number_detected_reward` (+1 if the completion has
a number, -1 if not) and `number_match_reward` (+3 if its last number equals the `answer` column,
-3 if not); the total reward is their sum (pass both to the trainer).

`proximity_reward(...)`: a numeric answer scored by how close it is, so a near miss earns more
than a wild guess (exact answers get the most; a sparse right/wrong signal gives GRPO nothing
to compare within a group where every answer is wrong).

Example 2, email automation: `email_rubric_reward(...)` scores a reply by the docs' rubric
(+1 a required keyword, +1 exactly the ideal reply, -1 too long, +1 the recipient's name, +1 a
signature block with a phone number, email address or street address).
"""

from __future__ import annotations

import re

from .text import completion_texts, normalize_number, numbers_in

_PHONE = re.compile(r"(?:\+?\d[\d\s().-]{6,}\d)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_ADDRESS = re.compile(r"\d+\s+\w+(?:\s\w+)*\s(?:street|st\.?|avenue|ave\.?|road|rd\.?|boulevard|blvd\.?|lane|ln\.?|"
                      r"drive|dr\.?|way|court|ct\.?)\b", re.I)


def _named(function, name: str):
    function.__name__ = function.__qualname__ = name
    return function


def number_detected_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """+1 when the completion contains a number, -1 when it does not (the docs' arithmetic example, function 1)."""
    return [1.0 if numbers_in(t) else -1.0 for t in completion_texts(completions)]


def number_match_reward(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """+3 when the completion's last number equals the `answer` column, -3 otherwise (function 2)."""
    if answer is None:
        raise ValueError("number_match_reward needs the dataset's `answer` column (none was passed)")
    texts = completion_texts(completions)
    return [3.0 if (n := normalize_number(t)) is not None and n == normalize_number(a) else -3.0
            for t, a in zip(texts, answer)]


def proximity_reward(max_score: float = 3.0, answer_column: str = "answer"):
    """A reward function scoring the completion's last number against `answer_column`:
    max_score * (1 - min(relative error, 2)), so exact = max_score, off by 10% = 0.9 * max_score,
    off by 100% or more = 0 down to -max_score; no number at all = -max_score.
    The relative error is |x - y| / max(|y|, 1), so answers near zero are judged in absolute terms."""

    def proximity(prompts=None, completions=None, **kwargs) -> list[float]:
        if kwargs.get(answer_column) is None:
            raise ValueError(f"proximity reward needs the dataset's {answer_column!r} column (none was passed)")
        scores = []
        for text, reference in zip(completion_texts(completions), kwargs[answer_column]):
            found, target = numbers_in(text), normalize_number(reference)
            if not found or target is None:
                scores.append(-max_score)
                continue
            error = abs(found[-1] - float(target)) / max(abs(float(target)), 1.0)
            scores.append(max_score * (1.0 - min(error, 2.0)))
        return scores

    return _named(proximity, "proximity_reward")


def email_rubric_reward(keywords=(), max_words: int = 150, ideal_column: str | None = "answer",
                        recipient_column: str | None = "recipient"):
    """A reward function for email replies by the docs' rubric, each criterion +1 (too long: -1).

    keywords: words a good reply contains (any one of them earns the point; case-insensitive).
    max_words: longer replies lose a point. ideal_column: the column with the ideal reply (exact
    match after trimming whitespace earns a point); recipient_column: the column with the
    recipient's name. Columns missing from the dataset simply score nothing.
    """
    keywords = tuple(k.lower() for k in keywords)

    def email_rubric(prompts=None, completions=None, **kwargs) -> list[float]:
        texts = completion_texts(completions)
        ideals = kwargs.get(ideal_column) if ideal_column else None
        names = kwargs.get(recipient_column) if recipient_column else None
        scores = []
        for i, text in enumerate(texts):
            lowered, score = text.lower(), 0.0
            if keywords and any(k in lowered for k in keywords):
                score += 1.0
            if ideals is not None and ideals[i] is not None and text.strip() == str(ideals[i]).strip():
                score += 1.0
            if len(text.split()) > max_words:
                score -= 1.0
            if names is not None and names[i] and str(names[i]).lower() in lowered:
                score += 1.0
            if _PHONE.search(text) or _EMAIL.search(text) or _ADDRESS.search(text):
                score += 1.0
            scores.append(score)
        return scores

    return _named(email_rubric, "email_rubric_reward")
