"""What a velotune session shows on the terminal: velotune's own messages, and not one known-irrelevant
third-party notice.

velotune's messages. The library has one output channel, the `velotune` logger (and its children):
memory estimate, training summary, loss plot, saved files, the fast-path decision, notices. Progress
bars and the command line print; the library does not. So that a script that configured no logging
still shows these lines (they used to be `print`s), the `velotune` logger gets level INFO (unless
one was set) and `TerminalHandler`, which writes the message alone to stderr, as Python's own
last-resort handler does for warnings, but only while the application has configured no logging
itself (the root logger has no handler). Once it has (`logging.basicConfig`, a framework, pytest),
the records reach its handlers by the usual propagation and this one stays silent, so no line is
written twice. `logging.getLogger("velotune").setLevel(logging.WARNING)` keeps only warnings.

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
import sys

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_COMMUNITY_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
LOGGER = "velotune"


class _DropKernelsCommunity(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_COMMUNITY_MESSAGE)


class TerminalHandler(logging.Handler):
    """velotune's records on stderr (message only) while the application has no logging set up."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the application's handlers get the record through propagation
            return
        try:
            stream = sys.stderr  # looked up at each record: the stream may have been replaced since import
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)


def install() -> None:
    """Idempotent: velotune's terminal handler, and one filter on bitsandbytes' CPU-ops logger."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsCommunity) for f in logger.filters):
        logger.addFilter(_DropKernelsCommunity())
    ours = logging.getLogger(LOGGER)
    if not any(isinstance(h, TerminalHandler) for h in ours.handlers):
        ours.addHandler(TerminalHandler())
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
