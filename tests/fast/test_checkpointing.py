"""use_gradient_checkpointing="unsloth": the same gradients as no checkpointing.

On the CPU the mode checkpoints plainly (offloading pays only on CUDA). The offloading autograd
function itself is exercised on the CPU by letting it run on CPU tensors (RuntimeSettings
`offload_on_cpu=True`, `offload_min_tokens=0`): the host copy is then a clone instead of a pinned
copy on a side stream, and everything else (forward under no_grad, recompute under the saved
RNG and autocast state, gradients of layer 0 whose input needs none) is the code the GPU runs.
"""

from __future__ import annotations

import pytest
import torch

from tiny.lora import batch, loss_and_grads, lora_model
from velotune.fast.checkpointing import OFFLOAD_MIN_TOKENS, LayerCheckpointer
from velotune.fast.plan import plan_step, runtime_settings, set_fast_path


def _assert_same(grads, reference):
    assert grads.keys() == reference.keys() and grads
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _offload_everywhere(model) -> LayerCheckpointer:
    settings = runtime_settings(model)
    assert settings.checkpointing == "unsloth"
    settings.offload_min_tokens, settings.offload_on_cpu = 0, True
    return model.get_base_model().model._checkpointer


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fused"])
def test_unsloth_mode_on_cpu_equals_no_checkpointing(fast):
    inputs = batch()
    reference = lora_model("llama")
    set_fast_path(reference, fast)
    _, expected = loss_and_grads(reference, inputs)
    model = lora_model("llama", checkpointing="unsloth")
    set_fast_path(model, fast)
    checkpointer = model.get_base_model().model._checkpointer
    _, grads = loss_and_grads(model, inputs)
    assert checkpointer.offloaded == 0  # CPU tensors: plain checkpointing
    _assert_same(grads, expected)


@pytest.mark.parametrize("family, fast", [("llama", True), ("gemma2", False), ("qwen3", True)])
def test_offloading_function_gives_the_same_gradients(family, fast, monkeypatch):
    inputs = batch()
    reference = lora_model(family)
    set_fast_path(reference, fast)
    expected_loss = loss_and_grads(reference, inputs)
    model = lora_model(family, checkpointing="unsloth")
    set_fast_path(model, fast)
    checkpointer = _offload_everywhere(model)
    from velotune.fast import lora_mlp

    calls = []
    with monkeypatch.context() as patch:  # count the recomputations that run the MLP in backward
        original = lora_mlp.LoraMLPInBackwardFunction.forward
        patch.setattr(lora_mlp.LoraMLPInBackwardFunction, "forward",
                      staticmethod(lambda *a: calls.append(1) or original(*a)))
        out, grads = loss_and_grads(model, inputs)
    assert checkpointer.offloaded == model.config.num_hidden_layers
    # Fused non-sandwich layers recompute their MLP in backward only; gemma2 (sandwich norms) never.
    assert len(calls) == (model.config.num_hidden_layers if fast and family != "gemma2" else 0)
    torch.testing.assert_close(out.loss, expected_loss[0].loss)
    _assert_same(grads, expected_loss[1])
    assert any("layers.0." in n and "lora_A" in n for n in grads)  # layer 0's input needs no grad


def test_recomputation_replays_the_random_state():
    """With dropout, the recomputed layer must draw the same masks as its forward did."""
    inputs = batch()
    reference = lora_model("llama", lora_dropout=0.3)
    torch.manual_seed(5)
    _, expected = loss_and_grads(reference, inputs)
    model = lora_model("llama", lora_dropout=0.3, checkpointing="unsloth")
    _offload_everywhere(model)
    torch.manual_seed(5)
    _, grads = loss_and_grads(model, inputs)
    _assert_same(grads, expected)


def _with_attention_dropout(model, p: float):
    decoder = model.get_base_model().model
    decoder.config.attention_dropout = p
    for layer in decoder.layers:
        layer.self_attn.attention_dropout = p
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_path_replays_the_random_state_only_where_drawn(dropout, monkeypatch):
    """Fast path: no LoRA dropout, so the RNG state is saved and replayed only for attention
    dropout; with it, the recomputation draws the forward's masks (gradients equal)."""
    inputs = batch()
    reference = _with_attention_dropout(lora_model("llama"), dropout)
    set_fast_path(reference, True)
    torch.manual_seed(5)
    _, expected = loss_and_grads(reference, inputs)
    model = _with_attention_dropout(lora_model("llama", checkpointing="unsloth"), dropout)
    set_fast_path(model, True)
    checkpointer = _offload_everywhere(model)
    saves = []
    original = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: saves.append(1) or original())
    torch.manual_seed(5)
    _, grads = loss_and_grads(model, inputs)
    assert checkpointer.offloaded == model.config.num_hidden_layers
    assert len(saves) == (0 if dropout == 0 else 2 * model.config.num_hidden_layers)  # forward + fork in backward
    _assert_same(grads, expected)


def test_trainer_reenabling_checkpointing_keeps_offloading():
    """transformers' Trainer calls gradient_checkpointing_enable at train start; "unsloth" stays."""
    model = lora_model("llama", checkpointing="unsloth")
    decoder = model.get_base_model().model
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert isinstance(decoder._gradient_checkpointing_func, LayerCheckpointer) and decoder.gradient_checkpointing
    plain = lora_model("llama", checkpointing=True).get_base_model().model
    assert not isinstance(plain._gradient_checkpointing_func, LayerCheckpointer)
    decoder.set_checkpointing(True)  # our own switch does change it
    assert not isinstance(decoder._gradient_checkpointing_func, LayerCheckpointer)


def test_the_plan_offloads_long_training_micro_batches_only():
    """The checkpoint mode is the plan's: offload from OFFLOAD_MIN_TOKENS tokens on the device
    (CUDA, or the CPU when a test asks), below it torch's checkpoint off the fast path (velotune's
    function keeping the input on the fast path: test_kept_inputs_...), none without grad, in eval or
    with a cache."""
    model = lora_model("llama", checkpointing="unsloth")
    step = dict(training=True, grad=True, tokens=OFFLOAD_MIN_TOKENS)
    assert plan_step(model, **step).checkpoint == "plain"  # CPU tensors
    assert plan_step(model, **step, device="cuda").checkpoint == "offload"
    runtime_settings(model).offload_on_cpu = True
    assert plan_step(model, **step).checkpoint == "offload"
    assert plan_step(model, **{**step, "tokens": OFFLOAD_MIN_TOKENS - 1}).checkpoint == "plain"
    assert plan_step(model, **{**step, "grad": False}).checkpoint == "off"
    assert plan_step(model, **{**step, "training": False}).checkpoint == "off"
    assert plan_step(model, **step, cache=True).checkpoint == "off"
    assert plan_step(model, **step, checkpointing=False).checkpoint == "off"
    assert plan_step(lora_model("llama", checkpointing=True), **step, device="cuda").checkpoint == "keep"


def test_the_plan_keeps_inputs_on_the_fast_path_without_offloading():
    """use_gradient_checkpointing=True, and "unsloth" where it does not offload, run velotune's own
    checkpoint on the fast path (the input kept on the device); off the fast path, and where DDP's
    find_unused_parameters needs it (`torch_checkpoint`), torch's checkpoint."""
    step = dict(training=True, grad=True, tokens=OFFLOAD_MIN_TOKENS)
    model = lora_model("llama", checkpointing=True)
    set_fast_path(model, True)
    assert plan_step(model, **step).checkpoint == "keep"
    assert plan_step(model, **step, device="cuda").checkpoint == "keep"
    runtime_settings(model).torch_checkpoint = True
    assert plan_step(model, **step, device="cuda").checkpoint == "plain"
    set_fast_path(model, False)
    runtime_settings(model).torch_checkpoint = False
    assert plan_step(model, **step, device="cuda").checkpoint == "plain"
    unsloth = lora_model("llama", checkpointing="unsloth")
    set_fast_path(unsloth, True)
    assert plan_step(unsloth, **step).checkpoint == "keep"  # CPU tensors: nothing to offload to
    assert plan_step(unsloth, **{**step, "tokens": OFFLOAD_MIN_TOKENS - 1}, device="cuda").checkpoint == "keep"
    assert plan_step(unsloth, **step, device="cuda").checkpoint == "offload"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_kept_inputs_give_the_same_gradients(family, monkeypatch):
    """use_gradient_checkpointing=True on the fast path: every layer goes through the checkpoint
    function with its input kept, the recomputation skips the MLP's forward (the MLP runs in backward
    only, except gemma2's sandwich norms), and the gradients equal the uncheckpointed model's."""
    from velotune.fast import lora_mlp

    inputs = batch()
    reference = lora_model(family)
    set_fast_path(reference, True)
    expected_out, expected = loss_and_grads(reference, inputs)
    model = lora_model(family, checkpointing=True)
    set_fast_path(model, True)
    checkpointer = model.get_base_model().model._checkpointer
    calls = []
    original = lora_mlp.LoraMLPInBackwardFunction.forward
    monkeypatch.setattr(lora_mlp.LoraMLPInBackwardFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    out, grads = loss_and_grads(model, inputs)
    layers = model.config.num_hidden_layers
    assert (checkpointer.kept, checkpointer.offloaded) == (layers, 0)
    assert len(calls) == (0 if family == "gemma2" else layers)
    torch.testing.assert_close(out.loss, expected_out.loss)
    _assert_same(grads, expected)


def test_a_kept_input_changed_in_place_is_an_error():
    """The kept input is held by reference: an in-place change between forward and backward would make
    the recomputation silently differ, so backward refuses it."""
    checkpointer = LayerCheckpointer()
    weight = torch.randn(4, 4, requires_grad=True)
    hidden = torch.randn(2, 4) * 1.0
    out = checkpointer(lambda h: h @ weight, hidden, offload=False)
    hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    fresh = torch.randn(2, 4)
    checkpointer(lambda h: h @ weight, fresh, offload=False).sum().backward()
    torch.testing.assert_close(weight.grad, fresh.sum(0)[:, None].expand(4, 4))


@pytest.mark.parametrize("n", [0, 1, 5, 1 << 20, (1 << 20) + 3, 344064 * 4096, 3 * (1 << 21) + 17])
def test_host_copy_pieces_are_powers_of_two_and_cover_the_tensor(n):
    from velotune.fast.checkpointing import MIN_PIECE, piece_lengths

    lengths = piece_lengths(n)
    assert sum(lengths) == n
    powers = [p for p in lengths if p >= MIN_PIECE]
    assert all(p & (p - 1) == 0 for p in powers) and powers == sorted(set(powers), reverse=True)
    assert len(lengths) - len(powers) <= 1  # at most one remainder, below MIN_PIECE
    # e.g. 344K tokens x 4096 (2.8 GB of bf16) is pinned as 2.8 GB, not rounded up to 4 GiB
    assert sum(1 << (p - 1).bit_length() for p in lengths) <= n + MIN_PIECE


def test_offloaded_round_trip_in_several_pieces(monkeypatch):
    """The layer input goes off and comes back in pieces (a 5-element minimum here): gradients
    still equal the uncheckpointed model's."""
    import velotune.fast.checkpointing as checkpointing

    monkeypatch.setattr(checkpointing, "MIN_PIECE", 5)
    inputs = batch()
    _, expected = loss_and_grads(lora_model("llama"), inputs)
    model = lora_model("llama", checkpointing="unsloth")
    _offload_everywhere(model)
    _, grads = loss_and_grads(model, inputs)
    _assert_same(grads, expected)


def test_an_unchecked_process_group_checkpoints_through_torch(monkeypatch):
    """Under a process group that no launch check has vetted (the GRPO and preference trainers, whose DDP wrapper
    transformers builds with find_unused_parameters=True for a PEFT model; a user's own DDP) the fast path
    checkpoints through torch's non-reentrant checkpoint: DDP would fail on the reentrant-style function. A launch
    check that saw find_unused_parameters=False lets velotune's function run again."""
    step = dict(training=True, grad=True, tokens=OFFLOAD_MIN_TOKENS)
    model = lora_model("llama", checkpointing=True)
    set_fast_path(model, True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert runtime_settings(model).torch_checkpoint is None
    assert plan_step(model, **step).checkpoint == "plain"
    runtime_settings(model).torch_checkpoint = False  # what check_launch sets for find_unused_parameters=False
    assert plan_step(model, **step).checkpoint == "keep"


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "kept"])
def test_a_second_backward_and_create_graph_are_refused_by_name(offload):
    checkpointer = LayerCheckpointer()
    weight = torch.randn(4, 4, requires_grad=True)
    message = r"recomputes each layer once.*retain_graph.*create_graph=True are not supported"
    out = checkpointer(lambda h: h @ weight, torch.randn(2, 4), offload=offload).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        out.backward()
    out = checkpointer(lambda h: h @ weight, torch.randn(2, 4), offload=offload).sum()
    with pytest.raises(RuntimeError, match=message):
        out.backward(create_graph=True)
