"""Fixtures for the GRPO tests: the tiny random Llama of the training tests, on one thread."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from training.helpers import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("rl"))


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops dominated by per-op overhead, on two shared cores: one thread is faster (tests/training)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
