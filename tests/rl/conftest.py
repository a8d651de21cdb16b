"""The RL tests run on one thread (tests/conftest.py: `one_thread`); their tiny model is the
session's `tiny_llama_dir`."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield
