"""The bundled datasets: shipped files equal a fresh build, rows are valid, answers are right."""

import re

from velotune.data import arithmetic_word_problems, bundled_path, load_bundled, validate_dataset
from velotune.data.bundled import BUNDLED, render_jsonl
from velotune.data.synthetic import number_in_words


def test_shipped_files_match_the_generators():
    for name, (_, build) in BUNDLED.items():
        assert bundled_path(name).read_text(encoding="utf-8") == render_jsonl(build()), name


def test_sizes_and_formats():
    assert validate_dataset(load_bundled("instructions")) == "alpaca"
    assert validate_dataset(load_bundled("conversations")) == "sharegpt"
    assert validate_dataset(load_bundled("arithmetic"), "grpo") == "grpo"
    assert [len(load_bundled(n)) for n in ("instructions", "conversations", "arithmetic")] == [300, 300, 200]
    turns = [len(c) for c in load_bundled("conversations")["conversations"]]
    assert min(turns) >= 4  # every conversation is multi-turn


def test_arithmetic_answers_follow_from_the_working():
    rows = arithmetic_word_problems(300, seed=5)
    assert rows == arithmetic_word_problems(300, seed=5) and rows != arithmetic_word_problems(300, seed=6)
    for row in rows:
        working = row["solution"].split(" = ")
        expression = working[0].replace("×", "*").replace("÷", "//")
        assert eval(expression, {}) == int(row["answer"]) == int(re.match(r"-?\d+", working[1]).group())
        assert int(row["answer"]) >= 0 and row["prompt"].endswith("?")


def test_number_words():
    assert [number_in_words(n) for n in (0, 13, 40, 57, 100, 919)] == [
        "zero", "thirteen", "forty", "fifty-seven", "one hundred", "nine hundred and nineteen"]
