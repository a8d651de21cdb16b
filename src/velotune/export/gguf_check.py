"""The GGUF file holds what the model holds: every tensor, every key, nothing cut short.

A logit comparison alone cannot tell damage from quantization: 4 KB of flipped bytes in one
q8_0 tensor moved the mean KL less than q4_0's own rounding does on a small model. But the
quantizers are deterministic (ours are byte-identical to llama.cpp's), so the expected content
of each tensor is known exactly: the check quantizes the model's tensor again and compares the
bytes. Where bytes differ (a tensor merged on another machine can differ in its last bit, and a
value on a rounding boundary then lands in the neighbouring code), each differing block's error
against the model's values must stay within `ROUNDING_SLACK` x the error of the block our
quantizer writes, so only a file that holds something the model does not is refused.

Right after an export the writer hands over a digest of the bytes it computed for each tensor
(from the model's tensor, by the same deterministic quantizer), so the check hashes the file
instead of quantizing everything a second time; only a tensor whose digest differs is
quantized again to say what is wrong with it. A check run later (`check_gguf` on a file)
quantizes every tensor.

Metadata: every key/value the writer would write for this model and tokenizer (hyperparameters,
vocabulary, merges, special token ids, chat template) must be in the file with the same value.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from . import quants
from .gguf_arch import TensorNamer
from .gguf_layout import GGUFLayout, read_layout
from .weights import base_model_of, materialize

logger = logging.getLogger("velotune")

ROUNDING_SLACK = 2.0  # a differing block may have up to 2x the squared error of the block we would write
_IGNORED_KEYS = {"general.name"}  # the model's name is not part of what it computes


class GGUFContentError(ValueError):
    """The file's tensors or metadata are not the model's."""


@dataclass(frozen=True)
class TensorReport:
    tensors: int  # tensors checked
    exact: int  # of them, byte-identical to a fresh quantization of the model's tensor
    rounding_blocks: int  # blocks that differ only by rounding (within ROUNDING_SLACK)


def _plain(value):
    """A reader/writer value in a comparable form (numbers as float64 after float32 rounding)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)):
        return float(np.float32(value))
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value


def _first_difference(want, got) -> str:
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{len(got)} entries in the file, {len(want)} expected"
        i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        return f"entry {i} is {got[i]!r} in the file, {want[i]!r} expected"
    return f"{got!r} in the file, {want!r} expected"


def digest(data: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8).data, digest_size=16).digest()


def check_metadata(writer: gguf.GGUFWriter, layout: GGUFLayout, path: Path) -> int:
    """Every key the writer announces must be in the file with the same value; returns the count."""
    problems = []
    expected = writer.kv_data[0]
    for key, item in expected.items():
        if key in _IGNORED_KEYS:
            continue
        if key not in layout.metadata:
            problems.append(f"{key} is missing")
            continue
        want, got = _plain(item.value), _plain(layout.metadata[key])
        if want != got:
            problems.append(f"{key}: {_first_difference(want, got)}")
    if problems:
        raise GGUFContentError(f"{path}: the metadata does not describe this model and tokenizer: "
                               + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5
                                                            else ""))
    return len(expected)


def _block_errors(data: np.ndarray, qtype, x: torch.Tensor) -> torch.Tensor:
    """Squared error of each block of `data` (rows of type_size bytes) against `x` (rows of block values)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    decoded = quants.dequantize(data, qtype, (data.shape[0], block)).double()
    return ((decoded - x.double()) ** 2).sum(1)


def compare_tensor(name: str, qtype, value: torch.Tensor, data: np.ndarray) -> tuple[bool, int, str | None]:
    """(exact, blocks differing by rounding, problem or None) for the file bytes `data` of one tensor
    whose model value (llama.cpp layout, float32) is `value`."""
    ref = quants.as_writable(quants.encode(value.reshape(-1, value.shape[-1]), qtype))
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if data.size != ref.size:
        return False, 0, f"{name}: {data.size:,} bytes in the file, {ref.size:,} expected for {qtype.name}"
    if np.array_equal(data, ref):
        return True, 0, None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    got, want = data.reshape(-1, type_size), ref.reshape(-1, type_size)
    rows = np.nonzero((got != want).any(axis=1))[0]
    x = value.reshape(-1, block)[torch.from_numpy(rows)]
    err_got, err_want = _block_errors(got[rows], qtype, x), _block_errors(want[rows], qtype, x)
    floor = (x.double().abs().amax(1) * 1e-6) ** 2 * block  # values a last bit apart
    bad = ~(err_got <= ROUNDING_SLACK * err_want + floor)  # NaN counts as bad
    if not bool(bad.any()):
        return False, len(rows), None
    worst = int(torch.nan_to_num(err_got - err_want, nan=float("inf")).argmax())
    return False, len(rows), (
        f"{name} ({qtype.name}): {int(bad.sum()):,} of {got.shape[0]:,} blocks differ from the model's weights by "
        f"more than {qtype.name} rounding explains (worst: block {int(rows[worst]):,}, squared error "
        f"{float(err_got[worst]):.3g} where {qtype.name} itself gives {float(err_want[worst]):.3g})")


@torch.no_grad()
def check_tensors(model, layout: GGUFLayout, plan, method: str, digests: dict[str, bytes] | None = None
                  ) -> TensorReport:
    """Every tensor of the file against the model's (see the module docstring)."""
    tensors, mixture = plan
    path = layout.path
    namer = TensorNamer(base_model_of(model).config)
    in_file = {t.name: t for t in layout.tensors}
    expected = {t.gguf_name for t in tensors}
    problems = [f"{n} is in the file but not in the model" for n in in_file if n not in expected]
    exact = rounding = 0
    for t in tensors:
        found = in_file.get(t.gguf_name)
        qtype = mixture.qtype(method, t)
        if found is None:
            problems.append(f"{t.gguf_name} is missing")
            continue
        shape = tuple(reversed(found.dims))
        if found.qtype != qtype or shape != tuple(t.shape):
            problems.append(f"{t.gguf_name} is {found.qtype.name} {shape} in the file; a {method} export of "
                            f"this model writes {qtype.name} {tuple(t.shape)}")
            continue
        data = layout.data(found)
        if digests is not None and digests.get(t.gguf_name) == digest(data):
            exact += 1  # the bytes the quantizer computed from the model's tensor, as written
            continue
        if t.extra is not None:
            value = t.extra.value.float()
        else:
            value = namer.convert(t.plan.name, materialize(model, t.plan))
        same, differing, problem = compare_tensor(t.gguf_name, qtype, value, data)
        exact += same
        rounding += differing if problem is None else 0
        if problem is not None:
            problems.append(problem)
    if problems:
        raise GGUFContentError(f"{path} does not hold the model's weights: " + "; ".join(problems[:5])
                               + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if rounding:
        logger.info("velotune: %s: %d blocks differ from this machine's quantization by rounding only", path.name,
                    rounding)
    return TensorReport(len(tensors), exact, rounding)


def check_file(model, path: Path, tokenizer, method: str, digests: dict[str, bytes] | None = None) -> TensorReport:
    """Size, metadata and every tensor of the GGUF file `path` written by a `method` export of `model`;
    `digests` (gguf name -> `digest` of the bytes written) lets an export skip quantizing again."""
    from .gguf_writer import model_name_of, plan_gguf

    layout = read_layout(path)  # a truncated file is named as such before anything maps it
    config = base_model_of(model).config
    [writer], tensors, mixture = plan_gguf(model, tokenizer, [method], model_name_of(config, path.parent))
    check_metadata(writer, layout, path)
    return check_tensors(model, layout, (tensors, mixture), method, digests)
