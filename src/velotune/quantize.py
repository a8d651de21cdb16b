"""Dynamic 4-bit quantization (the docs' "Unsloth Dynamic 4-bit"): a bitsandbytes NF4 folder whose most
damaged layers stay in 16-bit, chosen by measurement on calibration text.

    report = quantize_dynamic("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-dynamic-4bit")
    velotune quantize MODEL OUT --dynamic [--budget-gib X] [--calibration FILE]

Steps: calibration text runs through the 16-bit model; hooks measure every candidate layer's NF4 output
error ||X (W - NF4(W))^T||^2 on its real inputs (`quant/dynamic.py`); the layers with the largest error
stay in 16-bit, worst first, as long as the folder stays within the memory budget (default: 10% above
the all-4-bit size); the folder is written by the merged exporter (`merged_4bit_forced` with
`keep_16bit`), so velotune, transformers and Unsloth load it as any "bnb-4bit" checkpoint, the kept
layers listed in `quantization_config.llm_int8_skip_modules`.

Why the absolute error (per calibration token) ranks the layers, not the relative one: on SmolLM2-135M
the relative error is largest in the small v projections, and keeping 40 of them in 16-bit moved the
held-out perplexity from 12.19 (all NF4) to 11.81 (16-bit: 9.59), while the absolute error picks the
down and o projections, which write into the residual stream: 10.91 for the same 10% of memory.
The relative error is still reported in the table.

The held-out perplexities of the 16-bit, all-NF4 and dynamic models (text not used for calibration)
are measured in memory with the exact NF4 values the folder holds, and saved with the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data.bundled import bundled_rows
from .device import model_device
from .export.merged import quantizable_4bit, save_pretrained_merged
from .export.weights import TensorPlan, base_model_of, plan_tensors
from .fast.plan import find_decoder
from .quant.dynamic import Candidate, OutputErrorMeter, choose_16bit, nf4_nbytes
from .quant.int8 import is_linear8bit
from .quant.linear import _skipped, is_linear4bit

logger = logging.getLogger("velotune")

GIB = 1024**3
DEFAULT_EXTRA = 0.10  # default budget: the all-4-bit size plus 10%
# Always 16-bit, as the docs' dynamic quants do: MoE routers, vision towers and projectors (lm_head is
# never a candidate). Patterns are whole dotted parts of a module name (quant.linear's rule).
ALWAYS_16BIT = ("mlp.gate", "router", "vision_tower", "vision_model", "visual", "multi_modal_projector")
REPORT_JSON = "dynamic_4bit.json"
REPORT_TABLE = "dynamic_4bit.md"
# Bundled text: instructions rows [0, 200) calibrate, [200, 300) are held out for the perplexity check.
CALIBRATION_ROWS, HELDOUT_ROWS = slice(0, 200), slice(200, None)


@dataclass
class DynamicReport:
    """What `quantize_dynamic` chose and why: every candidate's error, the kept layers, the sizes."""

    candidates: list[Candidate]
    kept: list[str]  # chosen by error, in the order chosen (worst first)
    always_16bit: list[str]  # routers, vision towers and projectors: never candidates
    bytes_all_4bit: int  # the folder with every candidate in NF4: the smallest budget
    bytes_budget: int
    bytes_dynamic: int  # the folder as written
    calibration_tokens: int
    perplexity: dict[str, float] = field(default_factory=dict)  # "16-bit", "nf4", "dynamic" on held-out text
    heldout_tokens: int = 0
    folder: str | None = None

    def table(self, rows: int | None = None) -> str:
        """Markdown: the candidates by absolute error (worst first), with the decision."""
        lines = ["| module | params | abs error / token | rel. error | +MiB in 16-bit | kept |",
                 "|---|---:|---:|---:|---:|---|"]
        ranked = sorted(self.candidates, key=lambda c: -c.error)
        for c in ranked[:rows]:
            lines.append(f"| {c.name} | {c.numel:,} | {c.error:.4g} | {c.rel_error:.3%} | "
                         f"{c.extra_bytes / 2**20:.2f} | {'16-bit' if c.name in self.kept else ''} |")
        return "\n".join(lines)

    def summary(self) -> str:
        extra = self.bytes_dynamic / self.bytes_all_4bit - 1
        text = (f"{len(self.kept)} of {len(self.candidates)} layers kept in 16-bit; {self.bytes_dynamic / GIB:.4f} GiB "
                f"({extra:+.1%} over all-4-bit {self.bytes_all_4bit / GIB:.4f} GiB; budget {self.bytes_budget / GIB:.4f})")
        if self.perplexity:
            text += "; held-out perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in self.perplexity.items())
        return text

    def to_json(self) -> dict:
        out = asdict(self)
        for row in out["candidates"]:
            row["kept"] = row["name"] in self.kept
        return out


def bundled_text(split: str = "calibration") -> list[str]:
    """The bundled instruction rows as plain text; "calibration" and "heldout" never share a row."""
    rows = bundled_rows("instructions")[CALIBRATION_ROWS if split == "calibration" else HELDOUT_ROWS]
    return ["\n".join(part for part in (r["instruction"], r["input"], r["output"]) if part) for r in rows]


def read_texts(path: str | os.PathLike) -> list[str]:
    """A calibration file: .txt (whole text), .jsonl / .json (each row's "text", else its string values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist; pass a .txt, .jsonl or .json file")
    if path.suffix not in (".jsonl", ".json"):
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
    texts = []
    for row in rows if isinstance(rows, list) else [rows]:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict):
            texts.append(row["text"] if isinstance(row.get("text"), str) else
                         "\n".join(v for v in row.values() if isinstance(v, str)))
    if not any(t.strip() for t in texts):
        raise ValueError(f"calibration file {path} holds no text (rows need a 'text' field or string values)")
    return texts


def token_blocks(tokenizer, texts: list[str], max_tokens: int, seq_len: int) -> torch.Tensor:
    """Texts joined with EOS and cut into full sequences: (n_seq, seq_len) ids, at most max_tokens in all."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= max_tokens:
            break
    n_seq = min(len(ids), max_tokens) // seq_len
    if n_seq == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}; "
                         "give more text or a smaller seq_len")
    return torch.tensor(ids[: n_seq * seq_len]).view(n_seq, seq_len)


def _units(model) -> tuple[list[TensorPlan], list[TensorPlan], list[TensorPlan]]:
    """(candidates, always-16-bit, other tensors) of the checkpoint the folder will hold."""
    candidates, always, rest = [], [], []
    for plan in plan_tensors(model):
        if not quantizable_4bit(plan):
            rest.append(plan)
        elif _skipped(plan.name.removesuffix(".weight"), ALWAYS_16BIT):
            always.append(plan)
        else:
            candidates.append(plan)
    return candidates, always, rest


def all_4bit_bytes(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """The folder's size with every candidate layer in NF4 and the rest in `dtype`: the smallest budget."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    candidates, always, rest = _units(base_model_of(model))
    return sum(p.numel * itemsize for p in rest + always) + sum(nf4_nbytes(p.numel) for p in candidates)


def _module_names(plan: TensorPlan) -> list[str]:
    return [part.removesuffix(".weight") for part in plan.parts]


def _check_model(model) -> nn.Module:
    if hasattr(model, "peft_config"):
        raise ValueError("quantize_dynamic takes a plain 16-bit model; this one has LoRA adapters. Save it merged "
                         "first (save_pretrained_merged(..., save_method='merged_16bit')) and quantize that folder")
    if any(is_linear4bit(m) or is_linear8bit(m) for m in model.modules()):
        raise ValueError("quantize_dynamic measures the error of quantizing 16-bit weights, but this model is already "
                         "quantized; load it with load_in_4bit=False, load_in_8bit=False")
    return model


@torch.no_grad()
def _perplexity(model, ids: torch.Tensor, batch: int) -> float:
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch].to(device)  # (b, T)
        loss = model(input_ids=chunk, labels=chunk).loss
        n = chunk.numel() - chunk.shape[0]  # shifted labels per row
        total, count = total + loss.item() * n, count + n
    return math.exp(total / count)


def _swap(modules: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give each named module the weight in `weights` (its own dtype); returns what it held."""
    old = {}
    for name, w in weights.items():
        module = modules[name]
        old[name] = module.weight.data
        module.weight.data = w.to(old[name].dtype)
    return old


@contextlib.contextmanager
def _plain_path(model):
    """Module-by-module forwards while the meter's hooks listen: the fast path (CUDA's default) runs fused
    projections that never call the nn.Linear modules, so every hook would stay silent and every error read 0."""
    decoder = find_decoder(model)
    if decoder is None:  # a transformers model: always module by module
        yield
        return
    before = decoder.runtime.fast_path
    decoder.runtime.fast_path = False
    try:
        yield
    finally:
        decoder.runtime.fast_path = before


def choose_dynamic(model, tokenizer, budget_gib: float | None = None, calibration: str | os.PathLike | None = None,
                   max_tokens: int = 4096, seq_len: int = 512, batch: int = 4, dtype: torch.dtype = torch.bfloat16,
                   evaluate: bool = True, heldout_tokens: int = 2048) -> DynamicReport:
    """Measure every candidate layer's NF4 output error on calibration text and choose the 16-bit ones.

    `budget_gib`: the folder's size limit (default: the all-4-bit size + 10%); below the all-4-bit size is an
    error that names it. `dtype`: the 16-bit dtype the folder stores. `evaluate`: also the held-out perplexity
    of the 16-bit, all-NF4 and dynamic models (the bundled held-out rows; needs a second copy of the candidate
    weights in `dtype` while it runs).
    """
    base = base_model_of(_check_model(model))
    itemsize = torch.empty((), dtype=dtype).element_size()
    candidates, always, rest = _units(base)
    if not candidates:
        raise ValueError("this model has no decoder-layer linear weights to quantize")
    bytes_4bit = all_4bit_bytes(base, dtype)
    budget = bytes_4bit * (1 + DEFAULT_EXTRA) if budget_gib is None else budget_gib * GIB
    if budget < bytes_4bit:
        raise ValueError(f"budget_gib={budget_gib} is smaller than this model with every candidate layer in 4-bit: "
                         f"at least {bytes_4bit / GIB:.4f} GiB ({bytes_4bit:,} bytes) is needed; pass budget_gib "
                         f"(--budget-gib) {math.ceil(bytes_4bit / GIB * 1e4) / 1e4} or more")

    texts = read_texts(calibration) if calibration is not None else bundled_text("calibration")
    ids = token_blocks(tokenizer, texts, max_tokens, seq_len)
    modules = {name: base.get_submodule(name) for plan in candidates for name in _module_names(plan)}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(modules) * math.ceil(len(ids) / batch), desc="velotune: NF4 error per layer", unit="layer",
               leave=False)
    device = model_device(base)
    was_training = base.training
    base.eval()
    # The decoder without its LM head: no candidate reads the logits, which cost SmolLM2 as much as its layers.
    backbone = getattr(base, base.base_model_prefix, base)
    with _plain_path(base), torch.no_grad(), OutputErrorMeter(modules, dtype, cache=evaluate,
                                                             on_module=lambda _: bar.update(1)) as meter:
        for start in range(0, len(ids), batch):
            backbone(input_ids=ids[start:start + batch].to(device))
    bar.close()
    rows = []
    for plan in candidates:
        err = sum(meter.sums[n][0] for n in _module_names(plan))
        ref = sum(meter.sums[n][1] for n in _module_names(plan))
        rows.append(Candidate(plan.name.removesuffix(".weight"), plan.numel, plan.numel * itemsize,
                              nf4_nbytes(plan.numel), err / ids.numel(), err / ref if ref > 0 else 0.0))
    kept = choose_16bit(rows, int(budget - bytes_4bit))
    extra = sum(r.extra_bytes for r in rows if r.name in kept)
    report = DynamicReport(rows, kept, [p.name.removesuffix(".weight") for p in always], bytes_4bit, int(budget),
                           bytes_4bit + extra, ids.numel())
    if evaluate:
        _evaluate(base, tokenizer, meter, candidates, report, seq_len, batch, heldout_tokens)
    base.train(was_training)
    return report


def _evaluate(base, tokenizer, meter: OutputErrorMeter, candidates, report: DynamicReport, seq_len, batch,
              tokens) -> None:
    """Held-out perplexity with the weights the folder will hold: 16-bit (rounded to the folder's dtype), all
    NF4 (the meter's cached round trips), dynamic (NF4 but the kept layers)."""
    held = token_blocks(tokenizer, bundled_text("heldout"), tokens, min(seq_len, 256))
    modules = meter.modules
    sixteen = {n: m.weight.data.to(meter.dtype) for n, m in modules.items()}
    nf4 = {n: meter.roundtrip(n) for n in modules}
    kept = {n for plan in candidates if plan.name.removesuffix(".weight") in report.kept for n in _module_names(plan)}
    original = _swap(modules, sixteen)
    try:
        report.perplexity["16-bit"] = _perplexity(base, held, batch)
        _swap(modules, nf4)
        report.perplexity["nf4"] = _perplexity(base, held, batch)
        _swap(modules, {n: sixteen[n] for n in kept})
        report.perplexity["dynamic"] = _perplexity(base, held, batch)
    finally:
        _swap(modules, original)
    report.heldout_tokens = held.numel()


def quantize_dynamic(model_or_path, out: str | os.PathLike, tokenizer=None, budget_gib: float | None = None,
                     calibration: str | os.PathLike | None = None, max_tokens: int = 4096, seq_len: int = 512,
                     dtype: torch.dtype = torch.bfloat16, evaluate: bool = True, verify: bool = True,
                     overwrite: bool = False) -> DynamicReport:
    """Write a dynamic 4-bit bitsandbytes folder of a 16-bit model (a name or folder, or a model in memory
    with its `tokenizer`) into `out`; returns the report, also saved there as dynamic_4bit.json / .md.

    `verify`: load the folder back through velotune and transformers and compare with the 16-bit model (the
    merged exporter's check)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from .fast_language_model import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_or_path, load_in_4bit=False,
                                                             max_seq_length=seq_len)
    elif tokenizer is None:
        raise ValueError("quantize_dynamic(model, out) needs tokenizer=... for a model in memory (to tokenize "
                         "the calibration text and to save it beside the weights)")
    else:
        model = model_or_path
    report = choose_dynamic(model, tokenizer, budget_gib, calibration, max_tokens, seq_len, dtype=dtype,
                            evaluate=evaluate)
    logger.info("velotune: dynamic 4-bit: %s", report.summary())
    logger.info("velotune: layers by NF4 output error (worst 20; the whole table is in %s):\n%s", REPORT_TABLE,
                report.table(20))
    folder = save_pretrained_merged(model, out, tokenizer, save_method="merged_4bit_forced", dtype=dtype,
                                    verify=verify, overwrite=overwrite,
                                    keep_16bit=report.kept + report.always_16bit)
    report.folder = str(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (folder / REPORT_TABLE).write_text(f"# Dynamic 4-bit\n\n{report.summary()}\n\n{report.table()}\n")
    logger.info("velotune: dynamic 4-bit folder written to %s", folder)
    return report
