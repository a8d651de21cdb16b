"""Keep one known-irrelevant third-party message out of every velotune session.

bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is
imported on a CPU with AVX512-BF16 and the optional `kernels` package (a hub download) is not
there. PEFT imports bitsandbytes, so every `import velotune` (and every `velotune --help`) printed
it. velotune never uses that kernel: its CPU 4-bit path is its own exact NF4 code. So a filter on
that one bitsandbytes logger drops records starting with that text; every other bitsandbytes
message, and every other logger, is left as it is. It must be installed before bitsandbytes is
first imported, hence first thing in `velotune/__init__.py`.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_COMMUNITY_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsCommunity(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_COMMUNITY_MESSAGE)


def install() -> None:
    """Idempotent: one filter on bitsandbytes' CPU-ops logger."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsCommunity) for f in logger.filters):
        logger.addFilter(_DropKernelsCommunity())
