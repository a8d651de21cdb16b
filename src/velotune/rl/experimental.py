"""TRL 1.x keeps ORPO and CPO (SimPO) under `trl.experimental`, whose import warns that the API may
change. The user asked for velotune's ORPO/CPO, not for TRL's experimental module, so that one warning
is silenced where velotune imports them (TRL_EXPERIMENTAL_SILENCE would silence it process-wide)."""

from __future__ import annotations

import importlib
import warnings


def trl_experimental(module: str, name: str):
    """`trl.experimental.<module>.<name>`, imported without TRL's experimental-import warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        return getattr(importlib.import_module(f"trl.experimental.{module}"), name)
