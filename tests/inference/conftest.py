"""The engine tests reuse the parity suite's tiny family configs (tests/models/tiny_models.py)."""

import sys
from pathlib import Path

_MODELS = str(Path(__file__).resolve().parents[1] / "models")
if _MODELS not in sys.path:
    sys.path.insert(0, _MODELS)
