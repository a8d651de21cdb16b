"""Exported = trained: after every export, run the export and the in-memory model on the same few
prompts and compare their next-token distributions.

The comparison is the mean KL divergence KL(model || export) over every position, plus top-1
agreement. Budgets per format: a 16/32-bit export differs only by rounding (weights rounded to
the file's dtype, llama.cpp's fp16 KV cache and its own accumulation order), so its budget is
small; quantized formats get budgets a few times the mean KL llama.cpp's own perplexity tool
reports for them on Llama-class models (about 5e-4 q8_0, 2e-3 q6_k, 5e-3 q5_k_m, 2e-2 q4_k_m,
0.07 q3_k_m, 0.3 q2_k). Beyond its budget the check raises `ExportMismatchError`: the file does
not behave like the model that was trained.

GGUF files run in llama.cpp itself when `llama_cpp` (llama-cpp-python) is importable; otherwise
the file is read back with `gguf.GGUFReader`, dequantized with our `dequantize`, converted back
to transformers' layout and run in our own model class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .weights import base_model_of, model_dtype

KL_BUDGET = {
    "f32": 2e-3, "f16": 5e-3, "bf16": 1e-2, "q8_0": 2e-2, "q6_k": 5e-2, "q5_0": 0.1, "q5_1": 0.1,
    "q5_k_s": 0.1, "q5_k_m": 0.1, "q4_0": 0.25, "q4_1": 0.25, "q4_k_s": 0.2, "q4_k_m": 0.2, "q3_k_s": 0.6,
    "q3_k_m": 0.5, "q3_k_l": 0.5, "q2_k": 1.5,
}
MERGED_BUDGET = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NF4_BUDGET = 0.25

_TEXTS = ("The capital of France is", "def add(a, b):\n    return a +", "Once upon a time, there was")


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the trained model's by more than its format explains."""


@dataclass(frozen=True)
class Divergence:
    mean_kl: float
    max_kl: float
    top1: float
    positions: int

    def describe(self) -> str:
        return (f"mean KL {self.mean_kl:.2e} (max {self.max_kl:.2e}), top-1 agreement {self.top1:.0%} "
                f"over {self.positions} positions")


def probe_ids(tokenizer, vocab_size: int, max_len: int = 16) -> list[list[int]]:
    """A few short prompts as token ids (random ids when there is no tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (12,), generator=g).tolist() for _ in range(3)]
    out = []
    for text in _TEXTS:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
        out.append([i for i in ids if i < vocab_size])
    return out


@torch.no_grad()
def reference_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The in-memory (adapter) model's logits, (T, V) float32 per prompt."""
    was_training = model.training
    model.eval()
    device = next(base_model_of(model).parameters()).device
    try:
        return [model(input_ids=torch.tensor([p], device=device), use_cache=False).logits[0].float().cpu()
                for p in prompts]
    finally:
        model.train(was_training)


def compare(reference: list[torch.Tensor], exported: list[torch.Tensor]) -> Divergence:
    kls, agree, n = [], 0, 0
    for ref, exp in zip(reference, exported):
        p = torch.log_softmax(ref.float(), -1)  # (T, V)
        q = torch.log_softmax(exp.float()[:, : ref.shape[-1]], -1)
        kls.append((p.exp() * (p - q)).sum(-1))  # (T,)
        agree += int((ref.argmax(-1) == exp[:, : ref.shape[-1]].argmax(-1)).sum())
        n += ref.shape[0]
    kl = torch.cat(kls)
    return Divergence(float(kl.mean()), float(kl.max()), agree / max(n, 1), n)


def _judge(what: str, result: Divergence, budget: float, runner: str) -> Divergence:
    verdict = "OK" if result.mean_kl <= budget and math.isfinite(result.mean_kl) else "MISMATCH"
    print(f"velotune: export check ({runner}) {what}: {result.describe()}; budget {budget:.0e}: {verdict}")
    if verdict != "OK":
        raise ExportMismatchError(
            f"{what} does not behave like the trained model: {result.describe()}, above the {budget:.0e} this "
            "format's rounding explains. The file was kept for inspection; please report this with the model "
            "and the export call.")
    return result


def _fits(model, factor: float = 2.0) -> bool:
    size = sum(p.numel() * p.element_size() for p in base_model_of(model).parameters())
    return size * factor < psutil.virtual_memory().available * 0.5


def check_merged(model, folder: Path, tokenizer, quantized: bool = False) -> Divergence | None:
    """Load the merged folder with transformers' own class and compare it with `model`."""
    from transformers import AutoModelForCausalLM

    if not _fits(model, 4.0 if quantized else 2.0):
        print(f"velotune: export check of {folder} skipped: loading a second copy would not fit in memory")
        return None
    base = base_model_of(model)
    prompts = probe_ids(tokenizer, base.config.vocab_size)
    reference = reference_logits(model, prompts)
    device = next(base.parameters()).device
    export = AutoModelForCausalLM.from_pretrained(folder, dtype=model_dtype(model), device_map={"": device}).eval()
    with torch.no_grad():
        exported = [export(input_ids=torch.tensor([p], device=device), use_cache=False).logits[0].float().cpu()
                    for p in prompts]
    del export
    budget = NF4_BUDGET if quantized else MERGED_BUDGET.get(model_dtype(model), 2e-2)
    return _judge(str(folder), compare(reference, exported), budget, "transformers")


def llama_cpp_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    import llama_cpp

    n_ctx = max(32, max(len(p) for p in prompts) + 1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                          n_threads=min(4, psutil.cpu_count() or 1))
    try:
        out = []
        for prompt in prompts:
            llm.reset()
            llm.eval(prompt)
            out.append(torch.from_numpy(llm.scores[: len(prompt)].copy()).float())
        return out
    finally:
        llm.close()


def check_gguf(model, path: Path, tokenizer, method: str, runner: str | None = None) -> Divergence | None:
    """Run the GGUF file (llama.cpp when importable, else our reader) and compare with `model`."""
    base = base_model_of(model)
    if runner is None:
        try:
            import llama_cpp  # noqa: F401

            runner = "llama.cpp"
        except ImportError:
            runner = "velotune"
    if runner == "velotune" and not _fits(model, 4.0):
        print(f"velotune: export check of {path.name} skipped: without llama-cpp-python it needs an fp32 copy of "
              "the model, which would not fit in memory (pip install llama-cpp-python to check it in llama.cpp)")
        return None
    prompts = probe_ids(tokenizer, base.config.vocab_size)
    reference = reference_logits(model, prompts)
    if runner == "llama.cpp":
        exported = llama_cpp_logits(path, prompts)
    else:
        from .gguf_reader import model_from_gguf

        loaded = model_from_gguf(path, base)
        exported = reference_logits(loaded, prompts)
        del loaded
    return _judge(path.name, compare(reference, exported), KL_BUDGET.get(method, 0.5), runner)
