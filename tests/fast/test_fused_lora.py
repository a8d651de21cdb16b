"""Fused LoRA functions against PEFT's own LoRA layers: outputs and the gradients of x, A and B.

The reference is the real thing: PEFT's `lora.Linear` (dense base) and `lora.bnb.Linear4bit`
(NF4 base through bitsandbytes, which runs on the CPU). Adapters are initialised with
`init_lora_weights=False` so B is non-zero and every gradient term is exercised.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.activations import ACT2FN

from velotune.fast.lora_linear import lora_projections, projection_of, why_not_fused
from velotune.fast.lora_mlp import lora_mlp

torch.set_num_threads(2)
H, I, Q, KV = 32, 48, 32, 16
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-1, rtol=5e-2)}


class Block(nn.Module):
    """The projections of one decoder layer, named as ours (and transformers')."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(H, Q, bias=bias), nn.Linear(H, KV, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(H, KV, bias=bias), nn.Linear(Q, H, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)


def _block(dtype=torch.float32, nf4=False, bias=False, targets=None, **lora) -> Block:
    torch.manual_seed(0)
    block = Block(bias)
    if nf4:
        from velotune.quant.linear import to_linear4bit

        for name, child in list(block.named_children()):
            setattr(block, name, to_linear4bit(child, compute_dtype=dtype))
    block = block.to(dtype) if not nf4 else block
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets or list(Block(False)._modules),
                        init_lora_weights=False, **lora)
    block = inject_adapter_in_model(config, block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    return block


def _through(out: torch.Tensor, name: str) -> bool:
    """True when `out` was produced by the autograd node `name` (possibly behind a view)."""
    fn = out.grad_fn
    while fn is not None and name not in type(fn).__name__ and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn is not None and name in type(fn).__name__


def _adapter_params(block):
    return [p for n, p in block.named_parameters() if "lora_" in n]


def _grads(out_list, params, x):
    torch.manual_seed(1)
    loss = sum((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() for o in out_list)
    return torch.autograd.grad(loss, [x, *params])


def _compare(fused, plain, params, x, dtype):
    assert len(fused) == len(plain)
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f.float(), p.float(), **TOL[dtype])
    for name, gf, gp in zip(["x"] + [f"p{i}" for i in range(len(params))], _grads(fused, params, x),
                            _grads(plain, params, x)):
        torch.testing.assert_close(gf.float(), gp.float(), **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_qkv_and_o_match_peft(dtype, nf4):
    block = _block(dtype, nf4=nf4, bias=not nf4)
    x = torch.randn(2, 5, H, dtype=dtype, requires_grad=True)  # (B, T, H); T odd on purpose
    mods = [block.q_proj, block.k_proj, block.v_proj]
    plain = [m(x) for m in mods]
    fused = lora_projections(x, mods)
    assert all(_through(f, "LoraProjections") for f in fused)
    _compare(fused, plain, _adapter_params(block)[:6], x, dtype)
    o_in = torch.randn(2, 5, Q, dtype=dtype, requires_grad=True)
    _compare(lora_projections(o_in, [block.o_proj]), [block.o_proj(o_in)], _adapter_params(block)[6:8], o_in, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_mlp_matches_peft(dtype, nf4, act):
    block = _block(dtype, nf4=nf4)
    x = torch.randn(3, 7, H, dtype=dtype, requires_grad=True)
    mlp = (block.gate_proj, block.up_proj, block.down_proj)
    plain = block.down_proj(ACT2FN[act](block.gate_proj(x)) * block.up_proj(x))
    fused = lora_mlp(x, *mlp, act)
    assert _through(fused, "LoraMLP")
    _compare([fused], [plain], _adapter_params(block)[8:], x, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("targets", [None, ["gate_proj", "up_proj"]], ids=["all", "no-down-adapter"])
def test_mlp_in_token_chunks_matches_peft(monkeypatch, dtype, nf4, targets):
    """Long sequences run the per-token part of the MLP in chunks (7 rows here, 3 chunks of 21
    tokens, the last one short): outputs and every gradient still equal PEFT's."""
    import velotune.fast.lora_mlp as mlp_module

    monkeypatch.setattr(mlp_module, "CHUNK_TOKENS", 7)
    block = _block(dtype, nf4=nf4, targets=targets)
    x = torch.randn(3, 7, H, dtype=dtype, requires_grad=True)
    mlp = (block.gate_proj, block.up_proj, block.down_proj)
    plain = block.down_proj(ACT2FN["silu"](block.gate_proj(x)) * block.up_proj(x))
    fused = lora_mlp(x, *mlp, "silu")
    _compare([fused], [plain], [p for n, p in block.named_parameters() if "lora_" in n
                                and any(t in n for t in ("gate", "up", "down"))], x, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("chunk", [7, 4096], ids=["3-chunks", "1-chunk"])
@pytest.mark.parametrize("targets", [None, ["gate_proj", "up_proj"]], ids=["all", "no-down-adapter"])
def test_mlp_computed_in_backward_has_peft_gradients(monkeypatch, dtype, nf4, chunk, targets):
    """value_unused=True (a checkpoint's recomputation): forward keeps x alone, backward does all
    the work; the gradients of x and of every adapter equal PEFT's."""
    import velotune.fast.lora_mlp as mlp_module

    monkeypatch.setattr(mlp_module, "CHUNK_TOKENS", chunk)
    block = _block(dtype, nf4=nf4, targets=targets)
    x = torch.randn(3, 7, H, dtype=dtype, requires_grad=True)
    mlp = (block.gate_proj, block.up_proj, block.down_proj)
    plain = block.down_proj(ACT2FN["silu"](block.gate_proj(x)) * block.up_proj(x))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fused = lora_mlp(x, *mlp, "silu", value_unused=True)
    assert _through(fused, "LoraMLPInBackward") and fused.shape == plain.shape
    assert not any(I in shape for shape in saved if shape not in [(I, 4), (4, I)])  # no (N, I) tensor kept
    params = [p for n, p in block.named_parameters() if "lora_" in n and any(t in n for t in ("gate", "up", "down"))]
    for name, gf, gp in zip(["x"] + [f"p{i}" for i in range(len(params))], _grads([fused], params, x),
                            _grads([plain], params, x)):
        torch.testing.assert_close(gf.float(), gp.float(), **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


def test_mlp_saves_only_x_gate_up_and_adapters():
    """What the autograd graph keeps: x and the (N, I) gate/up outputs, the adapters (gate's and
    up's A stacked) and x A^T (N, r), never a dense weight or the (N, I) activation product."""
    block = _block(torch.float32, nf4=True)
    x = torch.randn(2, 3, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lora_mlp(x, block.gate_proj, block.up_proj, block.down_proj, "silu")
    assert sorted(saved) == sorted([(6, H), (6, I), (6, I), (8, H), (6, 8), (I, 4), (I, 4),  # x, g, u; gate/up LoRA
                                    (4, I), (6, 4), (H, 4)])  # down's LoRA
    assert not any(s in [(I, H), (H, I)] for s in saved)


class TowerMLP(nn.Module):
    """A vision tower's MLP without a gate (Mllama's, Qwen2-VL's): fc1, activation, fc2, both biased."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)


def _tower_mlp(dtype, nf4=False, targets=("fc1", "fc2")) -> TowerMLP:
    torch.manual_seed(0)
    mlp = TowerMLP()
    if nf4:
        from velotune.quant.linear import to_linear4bit

        mlp.fc1, mlp.fc2 = (to_linear4bit(m, compute_dtype=dtype) for m in (mlp.fc1, mlp.fc2))
    mlp = mlp if nf4 else mlp.to(dtype)
    mlp = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                             init_lora_weights=False), mlp)
    for name, p in mlp.named_parameters():
        p.requires_grad_("lora_" in name)
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("chunk", [7, 4096], ids=["3-chunks", "1-chunk"])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("targets", [("fc1", "fc2"), ("fc1",)], ids=["both", "no-fc2-adapter"])
def test_plain_mlp_keeps_x_alone_and_has_peft_gradients(monkeypatch, dtype, nf4, chunk, act, targets):
    """The towers' fc2(act(fc1(x))) as one node (lora_plain_mlp.py): output and the gradients of x and every
    adapter equal PEFT's modules composed with the activation, in one chunk and in 3 (21 rows, chunks of 7);
    the graph keeps x and the adapters, no (N, I) tensor."""
    import velotune.fast.lora_plain_mlp as plain_module
    from velotune.fast.lora_plain_mlp import lora_plain_mlp

    monkeypatch.setattr(plain_module, "CHUNK_TOKENS", chunk)
    mlp = _tower_mlp(dtype, nf4, targets)
    x = torch.randn(3, 7, H, dtype=dtype, requires_grad=True)
    plain = mlp.fc2(ACT2FN[act](mlp.fc1(x)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused = lora_plain_mlp(x, mlp.fc1, mlp.fc2, ACT2FN[act])
    assert _through(fused, "LoraPlainMLP") and fused.shape == plain.shape
    assert sorted(saved) == sorted([(21, H), *[s for t in targets for s in {"fc1": [(4, H), (I, 4)],
                                                                           "fc2": [(4, I), (H, 4)]}[t]]])
    params = [p for n, p in mlp.named_parameters() if "lora_" in n]
    _compare([fused], [plain], params, x, dtype)


def test_projections_without_adapter_and_disabled_adapter():
    """Un-targeted Linear layers and a disabled adapter run the base weight alone, like PEFT."""
    block = _block(torch.float32, targets=["q_proj"])
    x = torch.randn(2, 4, H, requires_grad=True)
    assert projection_of(block.k_proj).lora_A is None
    fused = lora_projections(x, [block.q_proj, block.k_proj])
    _compare(fused, [block.q_proj(x), block.k_proj(x)], _adapter_params(block), x, torch.float32)
    block.q_proj.enable_adapters(False)
    torch.testing.assert_close(lora_projections(x, [block.q_proj])[0], x @ block.q_proj.base_layer.weight.t())


@pytest.mark.parametrize(
    "lora, expected",
    [
        (dict(lora_dropout=0.1), "lora_dropout=0.1"),
        (dict(use_dora=True), "variant"),
        (dict(lora_bias=True), "adapter has a bias"),
    ],
)
def test_unsupported_settings_fall_back_with_a_reason(lora, expected):
    block = _block(torch.float32, **lora)
    assert expected in why_not_fused(block.q_proj)
    assert projection_of(block.q_proj) is None
    x = torch.randn(2, 4, H)
    block.eval()  # dropout off, so the module's own call is deterministic
    torch.testing.assert_close(lora_projections(x, [block.q_proj])[0], block.q_proj(x))  # the module's own call
    assert lora_mlp(x, block.gate_proj, block.up_proj, block.down_proj, "silu") is None


def test_trained_base_bias_is_not_fused():
    block = _block(torch.float32, bias=True)
    block.q_proj.base_layer.bias.requires_grad_(True)
    assert "trained" in why_not_fused(block.q_proj)


def _calls(prof, op: str) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == op)


def test_qkv_launches_adapter_casts_and_matmuls_once_per_group():
    """Each aten call is a kernel launch on CUDA, where these small LoRA ops are bound by launch
    overhead. bf16 input, fp32 adapters (as PEFT keeps them): forward casts all six adapter
    tensors with one cat + one cast and computes x [A_q; A_k; A_v]^T with one matmul; backward
    reuses those casts, gets every dA from one matmul and casts every adapter gradient at once.
    The gradients still match PEFT's."""
    from torch.profiler import ProfilerActivity, profile

    block = _block(torch.bfloat16)
    params = _adapter_params(block)[:6]
    for p in params:
        p.data = p.data.float()
    mods = [block.q_proj, block.k_proj, block.v_proj]
    x = torch.randn(2, 5, H, dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        fused = lora_projections(x, mods)
    grads = [torch.randn_like(o) for o in fused]
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        torch.autograd.backward(fused, grads)
    assert (_calls(forward, "aten::cat"), _calls(forward, "aten::_to_copy")) == (1, 1)
    assert _calls(forward, "aten::mm") == 4  # x W^T for q, k, v; x [A_q; A_k; A_v]^T
    assert _calls(forward, "aten::addmm_") == 3  # + s (x A^T) B^T, the scaling as alpha
    assert _calls(forward, "aten::mul") == 0
    assert _calls(backward, "aten::_to_copy") == 1  # every dA and dB, cast to fp32 together
    assert _calls(backward, "aten::mm") == 2  # dx from W_q; every dA from one matmul
    assert _calls(backward, "aten::mul") + _calls(backward, "aten::mul_") == 0  # scaling as alpha
    fused_grads = [p.grad.clone() for p in params]
    assert all(g.dtype == torch.float32 for g in fused_grads)
    for p in params:
        p.grad = None
    torch.autograd.backward([m(x) for m in mods], grads)
    for f, p in zip(fused_grads, params):
        torch.testing.assert_close(f, p.grad, **TOL[torch.bfloat16])
