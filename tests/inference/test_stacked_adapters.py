"""Generation's persistent adapter buffers (fast/stacked_adapters.py): decoding on them equals decoding
with the per-step stacking and casting of before, also after an optimizer step changed the fp32
adapters in place between two calls that reuse the engine's cache and buffers (the refresh).

The tiny Llama in bf16 with fp32 LoRA adapters (what get_peft_model gives a bf16 model), on the fast
path (forced on the CPU); "before" is the same engine with the buffers left out of its plan."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tiny.folders import write_tiny_llama
from velotune import FastLanguageModel
from velotune.fast import decode_linear, lora_linear, plan as plan_module
from velotune.fast.plan import plan_step, set_fast_path
from velotune.fast.stacked_adapters import stack_group, with_stacked_adapters
from velotune.inference import SamplingParams, engine, resident_of
from velotune.kernels import gemv as gemv_module

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, n=2, logprobs=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory):
    """The tiny Llama with one layer (the fast path's kernels run in Triton's interpreter here: per launch slow)."""
    folder = tmp_path_factory.mktemp("one-layer")
    write_tiny_llama(folder, num_hidden_layers=1)
    return folder


def _bf16_lora(folder):
    """The tiny Llama in bf16 with LoRA r=8 on every projection; B made non-zero so adapters count."""
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, load_in_4bit=False,
                                                 device_map="cpu", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    set_fast_path(model, True)
    return model


def _generate(model, buffers: bool) -> tuple[list[list[int]], torch.Tensor]:
    """(tokens per sequence, chosen log-probabilities (rows, steps)) of one engine call; buffers=False:
    the plan without the stacked adapters (every step stacks and casts them, as before)."""
    with contextlib.ExitStack() as stack:
        if not buffers:
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            patch.setattr(engine, "STACK_ADAPTERS", False)
        seqs = engine.generate(model, PROMPTS, PARAMS, eos_ids=set(), use_graphs=False)
    return [s.tokens for s in seqs], torch.tensor([s.logprobs for s in seqs])


def _buffers(model):
    return resident_of(model).graphs.runner.plan.layers[0].adapters


def _train_step(model, optimizer) -> None:
    """One optimizer step on the adapters (the fused autograd path: buffers never take part)."""
    model.train()
    ids = torch.tensor([PROMPTS[0] * 2])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_buffers_equal_per_step_casts_before_and_after_an_optimizer_step(one_layer_dir, monkeypatch):
    monkeypatch.setattr(plan_module, "GEMV_ROWS", 0)  # GRPO's rows: cuBLAS (group_forward), the GEMVs below
    model = _bf16_lora(one_layer_dir)
    engine.release(model)
    before_tokens, before_logps = _generate(model, buffers=False)
    engine.release(model)
    tokens, logps = _generate(model, buffers=True)
    buffers = _buffers(model)
    assert buffers is not None and buffers.qkv.a.dtype == torch.bfloat16 and buffers.qkv.a.shape == (24, 32)
    assert tokens == before_tokens
    torch.testing.assert_close(logps, before_logps, atol=0, rtol=0)  # same values, cast once instead of per step

    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 for p in adapters)
    _train_step(model, torch.optim.AdamW(adapters, lr=0.05))

    graphs = resident_of(model).graphs
    tokens, logps = _generate(model, buffers=True)
    assert resident_of(model).graphs is graphs and _buffers(model).qkv is buffers.qkv  # reused, so refreshed
    engine.release(model)
    fresh_tokens, fresh_logps = _generate(model, buffers=False)
    assert tokens == fresh_tokens
    torch.testing.assert_close(logps, fresh_logps, atol=0, rtol=0)
    # The step moved the outputs far more than bf16 rounding: stale buffers would fail the checks above.
    assert (fresh_logps - before_logps).abs().max() > 0.05 or fresh_tokens != before_tokens


def test_projections_on_buffers_equal_and_training_ignores_them(one_layer_dir):
    """lora_projections without autograd on a group's buffers equals its per-call stacking; with
    autograd the buffers are not read (the adapters get their gradients as before)."""
    model = _bf16_lora(one_layer_dir)
    plan = plan_step(model, cache=True)
    layer = plan.layers[0]
    stacked = stack_group(layer.qkv, torch.bfloat16)
    attn = model.get_base_model().model.layers[0].self_attn
    modules = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = lora_linear.lora_projections(x, modules, layer.qkv)
        got = lora_linear.lora_projections(x, modules, layer.qkv, stacked=stacked)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():
        layer.qkv[0].lora_A.add_(1.0)  # the adapters move; the buffers are not refreshed
        stale = lora_linear.lora_projections(x, modules, layer.qkv, stacked=stacked)
        moved = lora_linear.lora_projections(x, modules, layer.qkv)
    assert not torch.equal(stale[0], moved[0])  # no-grad calls read the buffers as they are
    with_grad = lora_linear.lora_projections(x, modules, layer.qkv, stacked=stacked)
    torch.testing.assert_close(with_grad[0].detach(), moved[0])  # autograd: the adapters themselves
    with_grad[0].float().sum().backward()
    assert layer.qkv[0].lora_A.grad is not None


def test_decode_gemv_on_buffers_equals_per_call_stacking(one_layer_dir, monkeypatch):
    """The decode GEMV path (decode_linear.py, Triton's interpreter here) with the buffers, q/k/v and the MLP."""
    monkeypatch.setattr(gemv_module, "CONFIG", {"dense": (64, 128, 4, False), "glu": (64, 128, 4, False)})
    model = _bf16_lora(one_layer_dir)
    layer = plan_step(model, cache=True).layers[0]
    qkv, gate_up, down = (stack_group(g, torch.bfloat16) for g in (layer.qkv, layer.mlp[:2], layer.mlp[2:]))
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = decode_linear.decode_projections(x, layer.qkv)
        got = decode_linear.decode_projections(x, layer.qkv, stacked=qkv)
        want_mlp = decode_linear.decode_mlp(x, layer.mlp, "silu")
        got_mlp = decode_linear.decode_mlp(x, layer.mlp, "silu", stacked=(gate_up, down))
    for a, b in zip([*got, got_mlp], [*want, want_mlp]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_nothing_is_stacked_without_adapters_or_on_the_plain_path(one_layer_dir):
    model = _bf16_lora(one_layer_dir)
    with model.disable_adapter():
        plan = plan_step(model, cache=True)
        assert with_stacked_adapters(plan, torch.bfloat16) is plan
    set_fast_path(model, False)
    plain = plan_step(model, cache=True)
    assert with_stacked_adapters(plain, torch.bfloat16) is plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_read_refreshed_buffers_on_cuda(one_layer_dir):
    """On CUDA the decode steps are graphs captured on the buffers: after an optimizer step the same graphs,
    replayed, give what a fresh eager engine without buffers gives (so the refresh reaches the graphs)."""
    model, _ = FastLanguageModel.from_pretrained(str(one_layer_dir), dtype=torch.bfloat16, load_in_4bit=False,
                                                 device_map="cuda", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator("cuda").manual_seed(1))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=4, logprobs=0)

    def run(graphs: bool, buffers: bool):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "STACK_ADAPTERS", buffers)
            seqs = engine.generate(model, PROMPTS, params, eos_ids=set(), use_graphs=graphs)
        return [s.tokens for s in seqs], torch.tensor([s.logprobs for s in seqs])

    engine.release(model)
    first = run(graphs=True, buffers=True)
    graphs = resident_of(model).graphs
    assert graphs.use_graphs and _buffers(model) is not None
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(adapters, lr=0.05)
    model.train()
    ids = torch.tensor([PROMPTS[0] * 2], device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tokens, logps = run(graphs=True, buffers=True)
    assert resident_of(model).graphs is graphs  # the same captured graphs, replayed
    engine.release(model)
    fresh_tokens, fresh_logps = run(graphs=False, buffers=False)
    assert tokens == fresh_tokens
    torch.testing.assert_close(logps, fresh_logps, atol=1e-2, rtol=0)
    assert (fresh_logps - first[1]).abs().max() > 0.05 or fresh_tokens != first[0]  # stale graphs would fail
