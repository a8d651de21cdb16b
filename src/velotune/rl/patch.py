"""`PatchFastRL`, the docs' first GRPO line, as a harmless no-op.

Unsloth rewrites TRL's trainers at import time; velotune patches nothing (DESIGN.md: no patching of
other libraries' classes), and `velotune.GRPOTrainer` is already the fast trainer. The call is kept
so the docs' notebooks run unchanged; an algorithm name that is not a string is still an error,
since that is a typo worth knowing about.
"""

from __future__ import annotations

KNOWN = ("GRPO", "DPO", "ORPO", "KTO", "SIMPO", "CPO", "PPO", "RLOO")


def PatchFastRL(algorithm: str | None = None, FastLanguageModel=None) -> None:  # noqa: N802 - the docs' name
    """Accepted for the docs' `PatchFastRL("GRPO", FastLanguageModel)`; changes nothing."""
    if algorithm is not None and not isinstance(algorithm, str):
        raise TypeError(f"PatchFastRL(algorithm={algorithm!r}): the algorithm is a name such as 'GRPO'")
    return None
