"""Shared fixtures: one tiny random Llama on disk for the whole training test session."""

from __future__ import annotations

import pytest

from .helpers import tiny_folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("training"))
