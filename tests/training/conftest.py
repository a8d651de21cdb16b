"""Shared fixtures: one tiny random Llama on disk for the whole training test session."""

from __future__ import annotations

import pytest

from .helpers import tiny_folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("training"))


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are small ops dominated by per-op overhead: one thread is faster than two, and far
    faster when the two cores are shared (measured: 3 SmolLM2 steps 6 s on one thread vs 100 s on two
    under load). Restored afterwards for the rest of the suite."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
