"""Tiny vision-language checkpoints of each family, written once per test session."""

from __future__ import annotations

import pytest

from tiny import vision as tiny


@pytest.fixture(scope="session")
def vision_folder(tmp_path_factory):
    """family -> folder holding the tiny model (seed 0) and its processor."""
    made = {}

    def folder(family: str):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            tiny.write(made[family], family)
        return made[family]

    return folder
