"""On CUDA: the CUDA-graph decode equals eager decode bit for bit (issue 16, item 4). Skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from tiny.families import make_config, randomize_
from velotune.inference import SamplingParams, generate_batch
from velotune.inference import engine
from velotune.lora import get_peft_model
from velotune.models import model_class_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_graph_decode_equals_eager_bit_for_bit(family):
    cfg = make_config(family)
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg)
    randomize_(model)
    model.max_seq_length = 64
    model = get_peft_model(model.to("cuda", torch.bfloat16), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, n=3, max_tokens=20, logprobs=0)
    runs = []
    for graphs in (True, False):
        engine.release(model)
        seqs = engine.generate(model, prompts, params, eos_ids=set(), use_graphs=graphs)
        runs.append([(s.tokens, s.logprobs) for s in seqs])
    assert runs[0] == runs[1]
    greedy = generate_batch(model, prompts, SamplingParams(temperature=0, max_tokens=12))
    assert all(len(o.outputs[0].token_ids) == 12 for o in greedy)


def _frozen(family: str, dtype: torch.dtype, nf4: bool = False):
    from velotune.quant import quantize_model_

    cfg = make_config(family)
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg)
    randomize_(model)
    model.max_seq_length = 64
    model.requires_grad_(False)
    model = model.to("cuda", dtype)
    if nf4:
        quantize_model_(model, skip_modules=("lm_head",), compute_dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
def test_gemv_graph_decode_equals_eager_bit_for_bit(nf4):
    """Batches of up to 8 rows decode through the GEMV kernels (dense and NF4, LoRA unmerged)."""
    model = get_peft_model(_frozen("llama", torch.bfloat16, nf4), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, n=2, max_tokens=16, logprobs=0)
    runs = []
    for graphs in (True, False):
        engine.release(model)
        seqs = engine.generate(model, prompts, params, eos_ids=set(), use_graphs=graphs)
        runs.append([(s.tokens, s.logprobs) for s in seqs])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("family, nf4", [("llama", False), ("gemma", False), ("llama", True)])
def test_gemv_decode_equals_plain_path_fp32(family, nf4, monkeypatch):
    """fp32 on CUDA: the GEMV kernels (IEEE fp32 products) give the plain path's greedy tokens."""
    from velotune.fast import plan as plan_module
    from velotune.fast.plan import set_fast_path

    model = _frozen(family, torch.float32, nf4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3, 4]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for fast in (True, False):
        set_fast_path(model, fast)
        engine.release(model)
        runs.append([s.tokens for s in engine.generate(model, prompts, params, eos_ids=set())])
    assert plan_module.GEMV_ROWS > 0
    assert runs[0] == runs[1]


def test_nf4_stream_gemv_decode_at_one_row(monkeypatch):
    """kernels/nf4_gemv_stream.py inside the engine at one row (`OWN_NF4_GEMV_AT_ONE_ROW`): CUDA-graph decode
    equals eager bit for bit (bf16, LoRA unmerged), and fp32 greedy equals the plain path's."""
    from velotune.fast import decode_linear
    from velotune.fast.plan import set_fast_path

    monkeypatch.setattr(decode_linear, "OWN_NF4_GEMV_AT_ONE_ROW", True)
    calls = {"stream": 0}
    real = decode_linear.nf4_gemv_stream

    def counted(*args, **kwargs):
        calls["stream"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_linear, "nf4_gemv_stream", counted)
    model = get_peft_model(_frozen("llama", torch.bfloat16, True), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=16, logprobs=0)
    runs = []
    for graphs in (True, False):
        engine.release(model)
        seqs = engine.generate(model, [[5, 6, 7, 8, 9, 10, 11]], params, eos_ids=set(), use_graphs=graphs)
        runs.append([(s.tokens, s.logprobs) for s in seqs])
    assert runs[0] == runs[1] and calls["stream"] > 0
    model = _frozen("llama", torch.float32, True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for fast in (True, False):
        set_fast_path(model, fast)
        engine.release(model)
        runs.append([s.tokens for s in engine.generate(model, [[5, 6, 7, 8, 9, 10, 11]], greedy, eos_ids=set())])
    assert runs[0] == runs[1]
