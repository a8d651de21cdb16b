"""Decoding through the small-batch GEMV kernels (fast/decode_linear.py) gives the engine's tokens
of before (its plain path: the module-by-module code, bitsandbytes' layers for NF4), greedy, token
for token, on tiny fp32 one-layer models: plain llama, q/k/v biases with LoRA adapters (qwen2:
base GEMV + bias + unmerged adapter terms, activation kernel apart), GeGLU (gemma), NF4 weights
(the fused NF4 GEMV), with and without adapters, partial rotary (phi3_partial); every decode step's
RoPE, cache write and attention through one kernel (kernels/decode_attention.py). On the CPU the kernels run in Triton's interpreter
(tests/conftest.py sets it), which is slow per launch: one layer, a few steps, one prompt (M = 1)
or two (M = 2). The fast path's own equality with the plain path is tested in tests/fast."""

from __future__ import annotations

import pytest
import torch

from tiny.families import make_config, randomize_
from velotune.fast import decode_linear
from velotune.fast import plan as plan_module
from velotune.fast.plan import set_fast_path
from velotune.inference import SamplingParams, engine
from velotune.inference import cache as cache_module
from velotune.kernels import gemv as gemv_module
from velotune.kernels import nf4_gemv as nf4_gemv_module
from velotune.kernels import nf4_gemv_stream as nf4_stream_module
from velotune.lora import get_peft_model
from velotune.models import model_class_for
from velotune.quant import quantize_model_

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(autouse=True)
def _wide_tiles(monkeypatch):
    """One program per 64 output rows: the interpreter's cost is per program (tests/kernels covers small tiles)."""
    monkeypatch.setattr(gemv_module, "CONFIG", {"dense": (64, 128, 4, False), "glu": (64, 128, 4, False)})
    monkeypatch.setattr(nf4_gemv_module, "CONFIG", {"dense": (64, 128, 4, True), "glu": (64, 128, 4, True)})
    monkeypatch.setattr(nf4_stream_module, "CONFIG", {key: (64, 128, 4, 0, True) for key in nf4_stream_module.CONFIG})


def _model(family: str, lora: bool = False, nf4: bool = False):
    cfg = make_config(family)
    cfg.num_hidden_layers = 1
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg)
    randomize_(model)
    model.max_seq_length = 64
    model.requires_grad_(False)  # frozen base weights (the fused path's condition); LoRA trains adapters only
    if nf4:
        quantize_model_(model, skip_modules=("lm_head",), compute_dtype=torch.float32)
    if lora:
        model = get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: make the adapters change the output
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _tokens(model, prompts, fast: bool, gemv_rows: int, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(plan_module, "GEMV_ROWS", gemv_rows)
    set_fast_path(model, fast)
    engine.release(model)
    return [s.tokens for s in engine.generate(model, prompts, PARAMS, eos_ids=set(), use_graphs=False)]


def _counting(monkeypatch):
    """Count the GEMV launches (dense and NF4) decode_linear makes and the fused decode attention
    steps the cache runs; the real kernels still run."""
    calls = {"gemv": 0, "nf4_gemv": 0, "nf4_gemv_stream": 0, "decode_attention": 0}
    for name in calls:
        module = cache_module if name == "decode_attention" else decode_linear
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


# (family, LoRA, NF4, prompts)
CASES = [("llama", False, False, 1), ("qwen2", True, False, 2), ("gemma", False, False, 2), ("phi3_partial", False, False, 1),
         ("llama", False, True, 1), ("llama", True, True, 2)]


@pytest.mark.parametrize("family, lora, nf4, count", CASES,
                         ids=[f"{f}{'-lora' if lora else ''}{'-nf4' if nf4 else ''}-m{m}" for f, lora, nf4, m in CASES])
def test_gemv_decode_equals_the_plain_path(family, lora, nf4, count, monkeypatch):
    model = _model(family, lora, nf4)
    prompts = PROMPTS[:count]
    plain = _tokens(model, prompts, False, plan_module.GEMV_ROWS, monkeypatch)
    calls = _counting(monkeypatch)
    got = _tokens(model, prompts, True, 8, monkeypatch)
    nf4_calls = calls["nf4_gemv"] + calls["nf4_gemv_stream"]
    assert (nf4_calls if nf4 else calls["gemv"]) > 0 and (calls["gemv"] if nf4 else nf4_calls) == 0, calls
    if nf4:  # one row of x: the stream kernel (decode_linear.NF4_STREAM_ROWS = 1); two: kernels/nf4_gemv.py
        assert calls["nf4_gemv_stream" if count == 1 else "nf4_gemv"] > 0, calls
    assert calls["decode_attention"] >= (PARAMS.max_tokens - 1) * model.config.num_hidden_layers, calls  # every step
    assert got == plain, f"GEMV decode {got} vs the plain path {plain}"
    assert all(len(t) == PARAMS.max_tokens for t in got)


def test_plan_gives_gemv_rows_to_cached_no_grad_calls_only():
    model = _model("llama")
    set_fast_path(model, True)
    decoder = model.model
    assert plan_module.plan_step(decoder, cache=True).gemv_rows == plan_module.GEMV_ROWS
    assert plan_module.plan_step(decoder, cache=True, grad=True).gemv_rows == 0
    assert plan_module.plan_step(decoder, training=True, grad=True).gemv_rows == 0
    set_fast_path(model, False)
    assert plan_module.plan_step(decoder, cache=True).gemv_rows == 0
