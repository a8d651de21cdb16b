"""Exported = trained: after every export, check that the files hold the trained model.

Merged folders: loaded back both through velotune's own loader (what `from_pretrained` reads:
the shard index, the adapter config, ...) and through transformers' class; each must give the
trained model's next-token distributions (mean KL within the dtype's rounding budget), so a
stale file that one loader prefers cannot hide behind the other.

GGUF files: `gguf_check` compares every tensor with a fresh quantization of the model's tensor
and every key with what the writer writes (exact: the quantizers are deterministic). Then, when
llama.cpp (llama-cpp-python) is importable, the file runs in llama.cpp and is compared with our
model running the weights the file holds: that isolates how llama.cpp reads the file (layout,
rope, norms, vocabulary) from the quantization error the user chose, which depends on the
model (a 135M model loses far more to q4_0 than a 7B one) and so cannot have a fair budget.
The quantization's cost (the file vs the trained model) is reported, never judged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..device import model_device
from ..models.from_folder import load_weights
from .weights import base_model_of, model_dtype

logger = logging.getLogger("velotune")

# llama.cpp against our model on the file's own weights: only llama.cpp's compute differs (fp16 KV cache,
# activations rounded to 8 bits for quantized matmuls, to fp16/bf16 for float ones). Measured (mean KL):
# see RUNNER_BUDGET_NOTE in docs/decisions.md ("Export checks").
RUNNER_BUDGET = {"f32": 2e-3, "f16": 5e-3, "bf16": 2e-2}
RUNNER_BUDGET_QUANTIZED = 5e-2
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
    device = model_device(base_model_of(model))
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
        # KL >= 0; float rounding of two equal distributions can give -1e-9, which must read as 0
        kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0))  # (T,)
        agree += int((ref.argmax(-1) == exp[:, : ref.shape[-1]].argmax(-1)).sum())
        n += ref.shape[0]
    kl = torch.cat(kls)
    return Divergence(float(kl.mean()), float(kl.max()), agree / max(n, 1), n)


def _judge(what: str, result: Divergence, budget: float, runner: str) -> Divergence:
    verdict = "OK" if result.mean_kl <= budget and math.isfinite(result.mean_kl) else "MISMATCH"
    logger.info("velotune: export check (%s) %s: %s; budget %.0e: %s", runner, what, result.describe(), budget,
                verdict)
    if verdict != "OK":
        raise ExportMismatchError(
            f"{what} does not behave like the trained model: {result.describe()}, above the {budget:.0e} this "
            "format's rounding explains. The file was kept for inspection; please report this with the model "
            "and the export call.")
    return result


def _fits(model, factor: float = 2.0) -> bool:
    size = sum(p.numel() * p.element_size() for p in base_model_of(model).parameters())
    return size * factor < psutil.virtual_memory().available * 0.5


@torch.no_grad()
def _logits(model, prompts: list[list[int]], device) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p], device=device), use_cache=False).logits[0].float().cpu()
            for p in prompts]


GREEDY_TOKENS = 8


@torch.no_grad()
def engine_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations on velotune's generation engine (what `for_inference` serves), EOS ignored
    so every row has GREEDY_TOKENS tokens."""
    from ..inference import SamplingParams, generate_batch

    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, min_tokens=GREEDY_TOKENS)
    return [out.outputs[0].token_ids for out in generate_batch(model, prompts, params)]


@torch.no_grad()
def _hf_greedy(model, prompts: list[list[int]], device) -> list[list[int]]:
    """Greedy continuations through transformers' own `generate` (what a user of the folder runs)."""
    rows = []
    for p in prompts:
        out = model.generate(input_ids=torch.tensor([p], device=device), attention_mask=torch.ones(1, len(p),
                             dtype=torch.long, device=device), max_new_tokens=GREEDY_TOKENS,
                             min_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0)
        rows.append(out[0, len(p):].tolist())
    return rows


@dataclass(frozen=True)
class MergedCheck:
    velotune: Divergence  # the folder through velotune's loader vs the trained model
    transformers: Divergence  # through transformers' class
    # per loader: prompts whose greedy continuation equals the trained model's on the engine, of all prompts
    greedy: dict[str, tuple[int, int]]


def same_on_every_cpu(model):
    """`model` (loaded by transformers) with its bitsandbytes 4-bit layers computing velotune's NF4 math.

    bitsandbytes 0.50 on a CPU with AVX512 runs native kernels: its dequantization reads each row's
    blocks from the row's start, wrong wherever quantization blocks straddle rows (in_features not a
    multiple of the blocksize, e.g. 96 or 160 columns in blocks of 64), and with AVX512-BF16 its layer
    also repacks its bytes on the first no-grad forward (block scales rounded to bf16; failing outright
    on a layer narrower than one block). Elsewhere it computes what ours computes (tests/kernels/
    test_nf4.py: bit for bit against its portable implementation). The check judges the folder, so it
    computes the same on every processor: `NF4Linear` (quant/nf4_linear.py) takes over the same
    Parameters, is still a `Linear4bit`, and on a GPU runs bitsandbytes' forward unchanged."""
    from ..quant.linear import is_linear4bit

    if any(is_linear4bit(m) for m in model.modules()):
        from ..quant.nf4_linear import adopt_linear4bit_layers_

        adopt_linear4bit_layers_(model)
    return model


def check_merged(model, folder: Path, tokenizer, quantized: bool = False) -> MergedCheck | None:
    """Load the merged folder through velotune's loader and through transformers' own class; both
    must compute what `model` computes (one at a time, so the memory is one extra copy)."""
    from transformers import AutoModelForCausalLM


    if not _fits(model, 4.0 if quantized else 2.0):
        logger.warning("velotune: export check of %s skipped: loading a second copy would not fit in memory", folder)
        return None
    base = base_model_of(model)
    prompts = probe_ids(tokenizer, base.config.vocab_size)
    reference = reference_logits(model, prompts)
    device = model_device(base)
    dtype = model_dtype(model)
    budget = NF4_BUDGET if quantized else MERGED_BUDGET.get(dtype, 2e-2)
    expected = engine_greedy(model, prompts)
    results, greedy = {}, {}
    loaders = {"velotune": lambda: load_weights(folder, dtype, device),
               "transformers": lambda: same_on_every_cpu(AutoModelForCausalLM.from_pretrained(
                   folder, dtype=dtype, device_map={"": device}))}
    for runner, load in loaders.items():
        loaded = load().eval()
        exported = _logits(loaded, prompts, device)
        got = engine_greedy(loaded, prompts) if runner == "velotune" else _hf_greedy(loaded, prompts, device)
        del loaded
        results[runner] = _judge(f"{folder} (loaded by {runner})", compare(reference, exported), budget, runner)
        greedy[runner] = (sum(a == b for a, b in zip(expected, got)), len(prompts))
        # Reported, not judged: the logits above are the verdict; a near-tie may flip one greedy token.
        log = logger.info if greedy[runner][0] == len(prompts) else logger.warning
        log("velotune: export check %s (loaded by %s): greedy continuations (%d tokens) equal the trained model's "
            "on the generation engine for %d of %d prompts", folder, runner, GREEDY_TOKENS, *greedy[runner])
    return MergedCheck(**results, greedy=greedy)


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


@dataclass(frozen=True)
class GGUFCheck:
    tensors: object  # gguf_check.TensorReport: every tensor and key compared with the model's
    runner: str | None  # "llama.cpp" when the file also ran there
    reads_as_written: Divergence | None  # llama.cpp vs our model on the file's own weights (judged)
    quantization: Divergence | None  # the file's weights vs the trained model (reported only)


def check_gguf(model, path: Path, tokenizer, method: str, runner: str | None = None,
               digests: dict[str, bytes] | None = None) -> GGUFCheck:
    """Check the GGUF file `path` of a `method` export of `model`: its size, metadata and every
    tensor (exactly), then how llama.cpp runs it (when installed). Raises ExportMismatchError."""
    from .gguf_check import GGUFContentError, check_file
    from .gguf_layout import GGUFFileError

    path = Path(path)
    try:
        tensors = check_file(model, path, tokenizer, method, digests)
    except (GGUFContentError, GGUFFileError) as error:
        raise ExportMismatchError(f"{error}. The file was kept for inspection.") from error
    logger.info("velotune: export check %s: %d tensors (%d byte-identical to the %s quantization of the model's) "
                "and the metadata match the model", path.name, tensors.tensors, tensors.exact, method)
    if runner is None:
        try:
            import llama_cpp  # noqa: F401

            runner = "llama.cpp"
        except ImportError:
            runner = "velotune"
    base = base_model_of(model)
    if not _fits(model, 4.0):
        logger.info("velotune: %s: the logit comparison was skipped (an fp32 copy of the model would not fit in "
                    "memory); every tensor was checked", path.name)
        return GGUFCheck(tensors, None, None, None)
    from .gguf_reader import model_from_gguf

    prompts = probe_ids(tokenizer, base.config.vocab_size)
    reference = reference_logits(model, prompts)
    loaded = model_from_gguf(path, base)
    own = reference_logits(loaded, prompts)  # our model on the file's weights
    del loaded
    quantization = compare(reference, own)
    logger.info("velotune: %s vs the trained model (what %s costs): %s", path.name, method, quantization.describe())
    if runner != "llama.cpp":
        return GGUFCheck(tensors, None, None, quantization)
    budget = RUNNER_BUDGET.get(method, RUNNER_BUDGET_QUANTIZED)
    cpp = _judge(f"{path.name} in llama.cpp vs the weights it holds", compare(own, llama_cpp_logits(path, prompts)),
                 budget, "llama.cpp")
    return GGUFCheck(tensors, "llama.cpp", cpp, quantization)
