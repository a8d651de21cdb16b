"""Export timings: merged_16bit and GGUF (f16, q8_0, q4_k_m, and all three in one pass).

    PYTHONPATH=src python bench/bench_export.py                     # CPU: the SmolLM2 fixture
    PYTHONPATH=src python bench/bench_export.py --model 8b          # GPU: a Llama-3-8B-shaped random model

The 8B model is built directly on the GPU in bf16 with random weights and LoRA (r=16) on every
linear layer, so the merge is real work; its tokenizer is a small BPE trained here (the GGUF's
vocabulary is padded to 128256 rows). Checks (exported=trained) are timed separately from the
writes. Where llama-cpp-python is installed, the classic route's last step is timed too:
llama.cpp's own `llama_model_quantize` from our f16 file to q4_k_m (the step the classic
"save 16-bit -> convert_hf_to_gguf.py -> llama-quantize" path ends with; convert itself is not
installed with llama-cpp-python). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from velotune.export import check_gguf, save_pretrained_gguf, save_pretrained_merged


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


REPEAT = 1  # set by --repeat: each timing is the fastest of that many runs (shared machines are noisy)


def _timed(fn):
    best, out = float("inf"), None
    for _ in range(REPEAT):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return out, best


def _size(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def smollm2():
    from velotune import FastLanguageModel

    return FastLanguageModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", load_in_4bit=False,
                                             max_seq_length=512, device_map="cpu", dtype=torch.float32)


def llama8b():
    """A Llama-3-8B-shaped model with LoRA on every linear layer, bf16, on the GPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from velotune import FastLanguageModel
    from velotune.models import model_class_for

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    with torch.device("meta"):
        model = model_class_for(config)(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    for rope in model.model.rotary_emb.values():
        rope.reset_frequencies()
    model.requires_grad_(False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules="all-linear",
                                             use_gradient_checkpointing=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    from velotune.chat_templates import get_chat_template

    return model.eval(), get_chat_template(tokenizer, "chatml")


def run(model, tokenizer, label: str, out: Path, check: bool) -> list[tuple[str, str, float, int]]:
    rows = []
    folder, seconds = _timed(lambda: save_pretrained_merged(model, out / "merged", tokenizer, verify=False))
    rows.append((label, "merged_16bit", seconds, _size([folder])))
    for methods in (["f16"], ["q8_0"], ["q4_k_m"], ["f16", "q8_0", "q4_k_m"]):
        name = "+".join(methods) + (" (one pass)" if len(methods) > 1 else "")
        target = out / f"gguf-{'-'.join(methods)}"
        paths, seconds = _timed(lambda: save_pretrained_gguf(model, target, tokenizer, quantization_method=methods,
                                                             verify=False))
        rows.append((label, f"gguf {name}", seconds, _size(paths)))
        if check and len(methods) == 1:
            _, seconds = _timed(lambda: check_gguf(model, paths[0], tokenizer, methods[0]))
            rows.append((label, f"  check {methods[0]}", seconds, 0))
    rows += _classic_quantize(label, out / "gguf-f16" / "model-F16.gguf", out / "classic-Q4_K_M.gguf")
    return rows


def _classic_quantize(label, f16: Path, target: Path):
    try:
        import llama_cpp
    except ImportError:
        return []
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    _, seconds = _timed(lambda: llama_cpp.llama_model_quantize(str(f16).encode(), str(target).encode(), params))
    return [(label, "llama.cpp llama_model_quantize f16 -> q4_k_m", seconds, target.stat().st_size)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "8b"], default="8b" if torch.cuda.is_available() else "smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip timing the exported=trained checks")
    parser.add_argument("--repeat", type=int, default=1, help="report the fastest of N runs of each step")
    args = parser.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = smollm2() if args.model == "smollm2" else llama8b()
    label = "SmolLM2-135M fp32 (CPU)" if args.model == "smollm2" else "Llama-3-8B-shaped bf16 + LoRA r16 (GPU)"
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(model, tokenizer, label, Path(tmp), check=not args.no_check and args.model == "smollm2")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\n{time.strftime('%Y-%m-%d')} commit {commit}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fastest of {REPEAT} run(s)\n")
    print("| model | export | seconds | size |\n|---|---|---:|---:|")
    for label, what, seconds, size in rows:
        print(f"| {label} | {what} | {seconds:.1f} | {size / 1e6:.0f} MB |" if size else
              f"| {label} | {what} | {seconds:.1f} | |")


if __name__ == "__main__":
    main()
