"""CUDA graphs of the checkpointed layers (fast/layer_graphs.py).

On the CPU the same code runs with every call eager (`cpu_rehearsal`): which forwards are
eligible, the gradients returned through `_GraphedCheckpointFunction`, their accumulation over
micro-batches, and when a layer's graphs are dropped. On a GPU: capture and replay give the
same loss and gradients as the eager layers, bit for bit, and follow an adapter's new data.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tiny.lora import batch, loss_and_grads, lora_model
from velotune.fast import layer_graphs, plan
from velotune.fast.plan import set_fast_path
from velotune.models import masks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unpadded(device="cpu", B=2, T=9, seed=0):
    inputs = batch(device, B=B, T=T, seed=seed)
    ids = inputs["input_ids"]
    return {"input_ids": ids, "labels": ids.clone()}


def _graphed_model(family="llama", device="cpu", checkpointing="unsloth", **kwargs):
    """A fast-path model whose layers are checkpointed (offloaded, or kept with checkpointing=True) and graphed."""
    model = lora_model(family, device=device, checkpointing=checkpointing, **kwargs)
    set_fast_path(model, True if device == "cpu" else None)
    decoder = model.get_base_model().model
    decoder.runtime.offload_min_tokens = 0
    decoder.runtime.offload_on_cpu = device == "cpu"
    decoder._graphs.cpu_rehearsal = device == "cpu"
    return model, decoder._graphs


def _layers(graphs) -> dict:
    assert len(graphs.shapes) <= 1
    return next(iter(graphs.shapes.values())).layers if graphs.shapes else {}


@pytest.mark.parametrize("family, checkpointing", [("llama", "unsloth"), ("qwen3", "unsloth"), ("llama", True)])
def test_graphed_layers_give_the_gradients_of_no_checkpointing(family, checkpointing):
    inputs = _unpadded()
    reference = lora_model(family)
    set_fast_path(reference, True)
    expected_out, expected = loss_and_grads(reference, inputs)
    model, graphs = _graphed_model(family, checkpointing=checkpointing)
    out, grads = loss_and_grads(model, inputs)
    layers = _layers(graphs)
    assert len(layers) == model.config.num_hidden_layers
    checkpointer = model.get_base_model().model._checkpointer
    assert checkpointer.kept == (model.config.num_hidden_layers if checkpointing is True else 0)
    assert all(g.forward_calls == 1 and g.backward_calls == 1 for g in layers.values())
    torch.testing.assert_close(out.loss, expected_out.loss)
    assert grads.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # A second micro-batch accumulates into .grad, as autograd does for the eager layers.
    second = model(**inputs).loss
    second.backward()
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, 2 * expected[name], rtol=1e-5, atol=1e-6)


def _calls(graphs) -> int:
    return sum(g.forward_calls for b in graphs.shapes.values() for g in b.layers.values())


def test_padded_and_packed_batches_read_their_masks_from_the_buffers():
    """Padding and packing masks are tensors: the graphs read a copy (StaticMasks), refreshed every forward. On the
    CPU the eager calls read those copies too, so a micro-batch reading the previous one's mask would show here."""
    reference = lora_model("llama")
    set_fast_path(reference, True)
    model, graphs = _graphed_model()
    B, T = 2, 9
    other = batch(seed=1)  # the same shape, another padding
    other["attention_mask"][0, :2] = 0
    other["labels"][0, :2] = -100
    packed = _unpadded(seed=2)
    packed["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]).repeat(B, 1)  # two sequences a row
    for inputs in (_unpadded(), batch(), other, packed):
        _, expected = loss_and_grads(reference, inputs)
        _, grads = loss_and_grads(model, inputs)
        for name, g in expected.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    buffers = next(iter(graphs.shapes.values()))
    assert _calls(graphs) == 3 * model.config.num_hidden_layers  # the masked ones: the unpadded had no mask
    assert buffers.masks["full_attention"].mask.shape == (B, 1, T, T)


def test_dropout_large_masks_and_the_switch_keep_the_layers_eager(monkeypatch):
    model, graphs = _graphed_model()
    monkeypatch.setattr(masks, "MAX_GRAPHED_MASK_ELEMENTS", 2 * 9 * 9 - 1)  # B x T x T of the padded batch
    model(**batch()).loss.backward()
    assert not graphs.shapes  # no buffers made for it either
    model(**_unpadded()).loss.backward()  # no mask: graphed whatever its size
    assert _calls(graphs) == model.config.num_hidden_layers
    graphs.shapes.clear()
    monkeypatch.setenv(plan.GRAPHS_ENV, "0")
    model(**_unpadded()).loss.backward()
    assert _calls(graphs) == 0
    monkeypatch.delenv(plan.GRAPHS_ENV)
    model.get_base_model().config.attention_dropout = 0.1  # random numbers drawn: replayed eagerly
    model(**_unpadded()).loss.backward()
    assert _calls(graphs) == 0
    model.get_base_model().config.attention_dropout = 0.0
    model(**_unpadded()).loss.backward()
    assert _calls(graphs) == model.config.num_hidden_layers


def test_large_layer_inputs_stay_eager(monkeypatch):
    model, graphs = _graphed_model()
    monkeypatch.setattr(plan, "MAX_GRAPHED_ELEMENTS", 2 * 9 * 64 - 1)  # B x T x hidden of the batch
    model(**_unpadded()).loss.backward()
    assert not graphs.shapes
    monkeypatch.setattr(plan, "MAX_GRAPHED_ELEMENTS", 2 * 9 * 64)
    model(**_unpadded()).loss.backward()
    assert _calls(graphs) == model.config.num_hidden_layers


def test_a_layer_with_new_adapter_data_gets_new_graphs():
    model, graphs = _graphed_model()
    model(**_unpadded()).loss.backward()
    before = dict(_layers(graphs))
    lora_B = model.get_base_model().model.layers[1].self_attn.q_proj.lora_B["default"].weight
    lora_B.data = lora_B.data.clone()  # same Parameter, new memory: a graph would read the old one
    model(**_unpadded()).loss.backward()
    after = _layers(graphs)
    assert after[0] is before[0] and after[1] is not before[1]


def test_rope_tables_of_another_layout_get_new_graphs():
    model, graphs = _graphed_model()
    inputs = _unpadded()
    model(**inputs).loss.backward()  # default positions: (1, T) tables
    before = dict(_layers(graphs))
    B, T = inputs["input_ids"].shape
    positions = torch.arange(T).repeat(B, 1)  # (B, T): the same positions, tables of another shape
    reference = lora_model("llama")
    set_fast_path(reference, True)
    _, expected = loss_and_grads(reference, {**inputs, "position_ids": positions})
    _, grads = loss_and_grads(model, {**inputs, "position_ids": positions})
    assert all(_layers(graphs)[i] is not g for i, g in before.items())
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_copies_and_pickles_of_a_model_start_without_graphs():
    model, graphs = _graphed_model()
    model(**_unpadded()).loss.backward()
    clone = copy.deepcopy(model)
    assert not clone.get_base_model().model._graphs.shapes
    assert graphs.shapes


def test_changing_shapes_stop_capturing_after_the_cap(monkeypatch):
    monkeypatch.setattr(layer_graphs, "MAX_CAPTURED_SHAPES", 2)
    model, graphs = _graphed_model()
    for T in (5, 6, 7):
        model(**_unpadded(T=T)).loss.backward()
    assert not graphs.shapes and graphs.failed and "shapes keep changing" in graphs.failed  # buffers let go
    model(**_unpadded(T=5)).loss.backward()  # eager from now on, still exact


def _step_grads(model, inputs):
    out, grads = loss_and_grads(model, inputs)
    return out.loss.detach(), grads


def _padded(device, B, T, seed):
    """A batch whose rows are left-padded by a different count each seed (same shape: one set of graphs)."""
    inputs = batch(device, B=B, T=T, seed=seed)
    inputs["attention_mask"][:] = 1
    inputs["attention_mask"][seed % B, :3 + 5 * seed] = 0
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("nf4, checkpointing, make", [(False, "unsloth", _unpadded), (True, "unsloth", _unpadded),
                                                      (True, True, _unpadded), (False, "unsloth", _padded)],
                         ids=["bf16", "nf4", "nf4-kept", "bf16-padded"])
def test_replayed_graphs_equal_the_eager_layers_on_cuda(nf4, checkpointing, make, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, graphs = _graphed_model(device="cuda", dtype=torch.bfloat16, nf4=nf4, checkpointing=checkpointing)
    micro_batches = [make("cuda", B=2, T=64, seed=s) for s in range(3)]
    monkeypatch.setenv(plan.GRAPHS_ENV, "0")
    expected = [_step_grads(model, b) for b in micro_batches]
    monkeypatch.delenv(plan.GRAPHS_ENV)
    got = [_step_grads(model, b) for b in micro_batches]  # eager, captured + replayed, replayed
    layers = model.config.num_hidden_layers
    assert graphs.failed is None and graphs.captures == 2 * layers and graphs.replays == 4 * layers
    for (loss, grads), (loss_ref, grads_ref) in zip(got, expected):
        assert torch.equal(loss, loss_ref)
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert torch.equal(grads[name], g), name


@cuda
@pytest.mark.gpu
def test_replayed_graphs_follow_new_adapter_data_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, graphs = _graphed_model(device="cuda", dtype=torch.bfloat16)
    inputs = _unpadded("cuda", B=2, T=64)
    for _ in range(2):
        _step_grads(model, inputs)  # captured
    lora_A = model.get_base_model().model.layers[0].mlp.up_proj.lora_A["default"].weight
    lora_A.data = lora_A.data * 2
    got = [_step_grads(model, inputs) for _ in range(2)]  # eager (new signature), then captured again
    monkeypatch.setenv(plan.GRAPHS_ENV, "0")
    loss_ref, grads_ref = _step_grads(model, inputs)
    for loss, grads in got:
        assert torch.equal(loss, loss_ref)
        for name, g in grads_ref.items():
            assert torch.equal(grads[name], g), name
