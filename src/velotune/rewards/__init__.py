"""Reward functions for GRPO with TRL's signature: `f(prompts, completions, **columns) -> list[float]`.

`completions` are strings (plain prompts) or lists of messages (conversational prompts: the
completion is `[{"role": "assistant", "content": ...}]`); every function here accepts both.
Dataset columns other than `prompt` arrive as keyword arguments (`answer=[...]`).

- `gsm8k`: the docs' GSM8K set (correctness against the answer column, integer answer, soft and
  strict format, XML tag count) for the `<reasoning>/<answer>` format, and the same set for the
  `<think>` format through `gsm8k_rewards("think")`.
- `recipes`: the docs' other examples (arithmetic, proximity-scored numbers, an email rubric).
"""

from .gsm8k import (REASONING_FORMAT, SYSTEM_PROMPT, THINK_FORMAT, THINK_SYSTEM_PROMPT, correctness_reward_func,
                    extract_answer, extract_hash_answer, extract_xml_answer, gsm8k_rewards, int_reward_func,
                    soft_format_reward_func, strict_format_reward_func, xmlcount_reward_func)
from .recipes import email_rubric_reward, number_detected_reward, number_match_reward, proximity_reward
from .text import completion_text, completion_texts, normalize_number

__all__ = ["REASONING_FORMAT", "SYSTEM_PROMPT", "THINK_FORMAT", "THINK_SYSTEM_PROMPT", "completion_text",
           "completion_texts", "correctness_reward_func", "email_rubric_reward", "extract_answer",
           "extract_hash_answer", "extract_xml_answer", "gsm8k_rewards", "int_reward_func", "normalize_number",
           "number_detected_reward", "number_match_reward", "proximity_reward", "soft_format_reward_func",
           "strict_format_reward_func", "xmlcount_reward_func"]
