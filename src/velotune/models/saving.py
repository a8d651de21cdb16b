"""Models and adapters are always saved as safetensors.

The docs' troubleshooting page says `save_pretrained(..., safe_serialization=None)` writes
safetensors, and every velotune loader and exporter reads safetensors first. PEFT would write
`adapter_model.bin` for None or False, and pickled `.bin` files run code when loaded; so our
`save_pretrained` methods pass True whatever was asked, and say so once per call when the caller
explicitly asked for `.bin` (False).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("velotune")


def safetensors_only(safe_serialization, what: str) -> bool:
    """The value to pass on (always True); one notice when `.bin` was asked for."""
    if safe_serialization is False:
        logger.warning("velotune: %s is saved as safetensors; safe_serialization=False (PyTorch .bin) is not "
                       "offered, since .bin files are pickles that run code when loaded. Every loader that reads "
                       ".bin reads safetensors too.", what)
    return True
