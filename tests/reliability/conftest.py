"""Fixtures of the training-side reliability tests: a tiny random Llama on disk per module, one thread."""

from __future__ import annotations

import pytest
import torch

from training.helpers import tiny_folder


@pytest.fixture(scope="module")
def tiny_dir(request, tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))


@pytest.fixture()
def one_thread():
    """Small ops dominated by per-op overhead run faster on one thread (see tests/training/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
