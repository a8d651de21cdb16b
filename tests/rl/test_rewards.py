"""velotune.rewards on hand-written completions, plain and conversational (TRL's two forms)."""

from __future__ import annotations

import pytest

from velotune import rewards as R

GOOD = "<reasoning>\n72 / 8 = 9,\nso each gets 9.\n</reasoning>\n<answer>\n9\n</answer>\n"
GOOD_NO_FINAL_NEWLINE = GOOD.rstrip("\n")
SLOPPY = "<reasoning>72/8 is 9</reasoning> <answer>9</answer>"
WRONG = "<reasoning>\nguess\n</reasoning>\n<answer>\n10\n</answer>\n"
PLAIN = "Each friend gets 9 apples."
TRAILING = GOOD + "extra words"


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_completion_text_reads_both_forms():
    assert R.completion_text("abc") == "abc"
    assert R.completion_text(chat("abc")) == "abc"
    assert R.completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"
    with pytest.raises(TypeError, match="string or a list of messages"):
        R.completion_text(3)


def test_normalize_number():
    assert R.normalize_number("$1,234.50") == "1234.5"
    assert R.normalize_number("9.0") == "9"
    assert R.normalize_number("the answer is -3") == "-3"
    assert R.normalize_number("none") is None


def test_extractors():
    assert R.extract_xml_answer(GOOD) == "9"
    assert R.extract_xml_answer("no tags 5") == "no tags 5"
    assert R.extract_hash_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert R.extract_hash_answer("7") is None
    assert R.extract_answer("<think>\nhmm\n</think>\n42", "think") == "42"
    assert R.extract_answer("<think>x</think><answer> 5 </answer>", "think") == "5"
    with pytest.raises(ValueError, match="format='xml'"):
        R.extract_answer("x", "xml")


@pytest.mark.parametrize("wrap", [lambda t: t, chat], ids=["plain", "conversational"])
def test_reasoning_format_set(wrap):
    completions = [wrap(t) for t in (GOOD, GOOD_NO_FINAL_NEWLINE, SLOPPY, WRONG, PLAIN, TRAILING)]
    prompts = ["q"] * len(completions)
    answer = ["Maya ... 72 / 8 = 9\n#### 9", "9", "9", "9", "9", "9"]
    assert R.correctness_reward_func(prompts, completions, answer=answer) == [2.0, 2.0, 2.0, 0.0, 0.0, 2.0]
    assert R.int_reward_func(prompts, completions) == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5]
    assert R.strict_format_reward_func(prompts, completions) == [0.5, 0.5, 0.0, 0.5, 0.0, 0.0]
    assert R.soft_format_reward_func(prompts, completions) == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5]
    xml = R.xmlcount_reward_func(prompts, completions)
    assert xml[0] == pytest.approx(0.5) and xml[1] == pytest.approx(0.5) and xml[3] == pytest.approx(0.5)
    assert xml[2] == pytest.approx(0.0) and xml[4] == 0.0
    assert xml[5] == pytest.approx(0.5 - 0.001 * len("extra words"))  # text after </answer> costs


def test_correctness_compares_numbers_not_formatting():
    completions = ["<answer>\n9.0\n</answer>", "<answer>\n$1,000\n</answer>", "<answer>\n9 or 10\n</answer>"]
    assert R.correctness_reward_func(None, completions, answer=["9", "1000", "9"]) == [2.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        R.correctness_reward_func(None, completions)


def test_think_format_set():
    xmlcount, soft, strict, integer, correct = R.gsm8k_rewards("think")
    assert correct.__name__ == "think_correctness_reward_func"
    good, sloppy, none = "<think>\n72/8\n</think>\n9", "<think>72/8</think> 9", "9"
    completions = [good, sloppy, none, chat(good)]
    assert correct(None, completions, answer=["9"] * 4) == [2.0, 2.0, 2.0, 2.0]
    assert strict(None, completions) == [0.5, 0.0, 0.0, 0.5]
    assert soft(None, completions) == [0.5, 0.5, 0.0, 0.5]
    assert integer(None, completions) == [0.5, 0.5, 0.5, 0.5]
    assert xmlcount(None, completions) == [0.5, 0.0, 0.0, 0.5]


def test_arithmetic_recipe_total():
    completions = ["2 + 2 = 4", "It is five", "maybe 5", chat("4")]
    detected = R.number_detected_reward(None, completions)
    matched = R.number_match_reward(None, completions, answer=["4"] * 4)
    assert detected == [1.0, -1.0, 1.0, 1.0]
    assert matched == [3.0, -3.0, -3.0, 3.0]
    assert [a + b for a, b in zip(detected, matched)] == [4.0, -4.0, -2.0, 4.0]


def test_proximity_recipe():
    reward = R.proximity_reward(max_score=3.0)
    scores = reward(None, ["100", "90", "0", "400", "no idea", "-1"], answer=["100"] * 5 + ["0"])
    assert scores[:5] == pytest.approx([3.0, 2.7, 0.0, -3.0, -3.0])
    assert scores[5] == pytest.approx(0.0)  # |(-1) - 0| / max(0, 1) = 1: judged in absolute terms near zero
    assert scores[0] > scores[1] > scores[2] > scores[3]


def test_email_rubric_recipe():
    reward = R.email_rubric_reward(keywords=["refund"], max_words=20)
    ideal = "Dear Ana, your refund is on its way."
    replies = [ideal, "Dear Ana, refund sent.\nBest,\nBo\nPhone: +1 555 010 2030",
               "hello " * 30, "Dear Ana, thanks. bo@example.com"]
    scores = reward(None, replies, answer=[ideal] * 4, recipient=["Ana"] * 4)
    assert scores == [3.0, 3.0, -1.0, 2.0]
    assert R.email_rubric_reward()(None, ["hi"]) == [0.0]  # no columns, no keywords: nothing to earn


def test_reward_calls_refuse_infinite_rewards():
    from velotune.rl.reward_calls import RewardFunctionError, call_reward_functions

    def explodes(prompts, completions, **kwargs):
        return [1.0, float("inf")]

    with pytest.raises(RewardFunctionError, match=r"'explodes' returned inf for completion 1 at step 2"):
        call_reward_functions([explodes], ["p", "p"], ["a", "b"], {}, step=2)
