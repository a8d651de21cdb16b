"""Mllama (Llama 3.2 Vision) on velotune's own text decoder (models/mllama.py): the self-attention layers are our
DecoderLayers, the cross-attention layers transformers' own modules borrowed into our decoder. Against transformers'
MllamaForConditionalGeneration of the same weights (fp32): logits and loss with images and text only, every LoRA
gradient against transformers + PEFT on the plain and the fast path under each checkpointing mode, greedy
generation, and the module tree, save_pretrained and the merged export, which stay transformers'.

The tiny checkpoint's cross-attention gates are opened (Mllama initialises them at 0, which would make the image
invisible to the text and leave the vision tower without gradients)."""

from __future__ import annotations

import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

from velotune import FastVisionModel, UnslothVisionDataCollator
from velotune.fast.plan import plan_step, set_fast_path
from velotune.models.decoder import DecoderLayer
from velotune.models.mllama import MllamaForConditionalGeneration, MllamaTextDecoder, OwnGradient
from velotune.models.mllama_tiles import used_tiles
from velotune.vision.processors import load_processor

from tiny import vision as tiny

from .test_collator import _rows
from .test_vision_own_decoder import fused_calls, mixed_batch, mlp_value_flags


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Mllama (text layers: 0 self-attention, 1 cross-attention) with open cross-attention gates."""
    path = tmp_path_factory.mktemp("mllama_open")
    model, processor = tiny.build("mllama")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("cross_attn_attn_gate"):
                parameter.fill_(0.8)
            elif name.endswith("cross_attn_mlp_gate"):
                parameter.fill_(-0.6)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _reference(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)


def _text_batch(processor):
    batch = processor(text=["hi there", "a longer line of text"], add_special_tokens=False, return_tensors="pt",
                      padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _prompt_batch(processor, side: str = "left"):
    """Padded prompts (left: as for generation): one image and a question, and a shorter text-only row (with an
    image on transformers 5.17, whose processor wants one in every row)."""
    processor.tokenizer.padding_side = side
    image = Image.new("RGB", (40, 28), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return mixed_batch(processor, text, "hi there", image)


@pytest.mark.parametrize("images", [True, False])
def test_logits_and_loss_equal_transformers(folder, images):
    reference = _reference(folder)
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    decoder = ours.model.language_model
    assert isinstance(decoder, MllamaTextDecoder) and decoder.borrowed_layers == {1}
    assert isinstance(decoder.layers[0], DecoderLayer)
    assert isinstance(decoder.layers[1], MllamaCrossAttentionDecoderLayer)  # transformers' module, taken whole
    processor = load_processor(folder, False)
    batch = UnslothVisionDataCollator(reference, processor)(_rows()) if images else _text_batch(processor)
    assert ("pixel_values" in batch) is images
    outputs, calls = [], []
    hook = decoder.layers[1].register_forward_hook(lambda *_: calls.append(1))
    for model in (ours, reference):
        model.train()  # dropout is 0; train mode takes the training path (no cache)
        outputs.append(model(**batch, return_logits=True) if model is ours else model(**batch))
    hook.remove()
    assert len(calls) == (1 if images else 0)  # text only: the cross layer is skipped, as transformers skips it
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs[0].logits[real], outputs[1].logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-6, atol=1e-6)
    if images:  # the image reaches the text: closing the gates changes the logits
        with torch.no_grad():
            decoder.layers[1].cross_attn_attn_gate.zero_()
            decoder.layers[1].cross_attn_mlp_gate.zero_()
            closed = ours(**batch, return_logits=True).logits
        assert not torch.allclose(closed[real], outputs[0].logits[real], atol=1e-3)


def _peft_pair(folder, checkpointing):
    """(velotune's LoRA model, transformers' model + PEFT with the same adapters on the same layers), both in
    training mode. Every B is random so every A gets a gradient."""
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    targets = sorted({name.removeprefix("base_model.model.").rpartition(".lora_A")[0]
                      for name, _ in model.named_modules() if name.endswith(".lora_A")})
    assert any(".cross_attn." in t for t in targets) and any(".vision_model." in t for t in targets)
    reference = peft_get_peft_model(_reference(folder), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=targets))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    missing = reference.load_state_dict({n: p.detach().clone() for n, p in lora.items()}, strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "lora_" in k]
    FastVisionModel.for_training(model)
    reference.train()
    return model, reference, processor


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def _small_image_rows():
    """Two conversations whose images fill 1 and 2 of the tiny model's 4 tiles (16 px tiles)."""
    def row(size, colour, answer):
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", size, colour)},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    return [row((12, 12), (200, 0, 0), "red"), row((30, 14), (0, 0, 200), "a blue strip")]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_tiles_no_token_attends_to_leave_before_the_projector(folder, fast, monkeypatch):
    """Images filling 1 and 2 of 4 tiles: the projector and the cross-attention layer see the 2 used tiles of each
    row (mllama_tiles.py), and the loss and every LoRA gradient (the vision tower's too, whose padding tiles now get
    a zero gradient from the left-out rows) stay transformers' + PEFT's, which project all 4."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, reference, processor = _peft_pair(folder, "unsloth")
    set_fast_path(model, fast)
    batch = UnslothVisionDataCollator(model, processor)(_small_image_rows())
    assert batch["aspect_ratio_mask"].sum(-1).flatten().tolist() == [1, 2]
    tiles = used_tiles(batch["cross_attention_mask"])
    assert tiles.tolist() == [[0, 1], [0, 1]]  # row 0: its one used tile and one left-out tile, still masked
    seen = {}  # the image states each cross-attention layer gets: (B * tiles, patches, C)
    for name, net in (("ours", model.get_base_model()), ("theirs", reference.get_base_model())):
        net.model.language_model.layers[1].register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.update({name: kwargs["cross_attention_states"].shape[:2]}),
            with_kwargs=True)
    ours, theirs = model(**batch), reference(**batch)
    patches = seen["theirs"][1]
    assert seen["ours"] == (2 * 2, patches) and seen["theirs"] == (2 * 4, patches)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    mine, expected = _grads(model), _grads(reference)
    assert mine.keys() == expected.keys()
    for name, grad in expected.items():
        assert mine[name] is not None, name
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_tile_used_or_a_cache_keeps_them_all(folder):
    """Nothing to leave out when every tile is attended (None), and a cached call (generation's prefill) projects
    every tile: later calls' masks index the cross layers' cached keys by tile. With eager attention in the tower
    (transformers' forward runs) the tiles are gathered from its output, with the same logits."""
    mask = torch.ones(2, 3, 1, 4, dtype=torch.long)
    assert used_tiles(mask) is None
    mask[:, :, 0, 2:] = 0
    assert used_tiles(mask).tolist() == [[0, 1], [0, 1]]
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = load_processor(folder, False)
    batch = UnslothVisionDataCollator(ours, processor)(_small_image_rows())
    seen = []
    ours.model.language_model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["cross_attention_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        ours(**batch, use_cache=True)
        split = ours(**batch, use_cache=False).logits
        tower = ours.model.vision_model
        assert tower.transformer.layers[0].self_attn.config is tower.config
        tower.config._attn_implementation = "eager"  # the class's tower forward, the tiles gathered from its output
        masked = ours(**batch, use_cache=False).logits
    assert seen == [2 * 4, 2 * 2, 2 * 2]
    torch.testing.assert_close(masked, split, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("checkpointing", [False, True, "unsloth"], ids=["off", "true", "unsloth"])
def test_lora_gradients_equal_transformers_and_peft(folder, fast, checkpointing, monkeypatch):
    """Every LoRA parameter's gradient (both towers, self- and cross-attention, MLPs, projector). The fast path is
    forced on the CPU (its kernels run their PyTorch references, as in test_vision_own_decoder.py), "unsloth" offloads
    to host copies; the plan and our layer checkpointer see the self-attention layer only (the cross layer checkpoints
    itself: get_peft_model's call of transformers' toggle flagged it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, reference, processor = _peft_pair(folder, checkpointing)
    decoder = model.get_base_model().model.language_model
    set_fast_path(model, fast)
    decoder.runtime.offload_on_cpu, decoder.runtime.offload_min_tokens = True, 0
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    plan = plan_step(decoder, training=True, grad=True, labels=True, tokens=batch["input_ids"].numel())
    assert plan.fast is fast and plan.checkpoint == {False: "off", True: "keep" if fast else "plain",
                                                     "unsloth": "offload"}[checkpointing]
    if fast:
        assert plan.layers[1] is None and plan.layers[0] is not None  # the cross layer is not in the plan
    checkpointed = decoder._checkpointer.kept + decoder._checkpointer.offloaded
    fused = fused_calls(monkeypatch)  # transformers' layers through our fused LoRA (tower_lora.py): fast path only
    flags = mlp_value_flags(monkeypatch)
    ours = model(**batch)
    assert (ours.logits is None) is fast  # the fused cross-entropy ran on the fast path
    # q/k/v, o, the MLP (fc1 and fc2 as one node) of the tiny tower's 3 layers, the projector, then the
    # cross-attention layer's q, k, v, o
    assert fused[:14] == ([3, 1, 2] * 3 + [1] + [1] * 4 if fast else [])
    theirs = reference(**batch)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    if fast and checkpointing:  # our checkpointer ran the self-attention layer only
        assert decoder._checkpointer.kept + decoder._checkpointer.offloaded - checkpointed == 1
    # the tiny tower's 3 layer MLPs (2 local, 1 gated global whose gate is frozen): forward, then, offloaded, their
    # recomputations without values
    assert flags == ([False] * 3 + [True] * 3 if checkpointing == "unsloth" else [False] * 6 if checkpointing
                     else [False] * 3) if fast else not flags
    mine, expected = _grads(model), _grads(reference)
    assert mine.keys() == expected.keys() and len(mine) > 40
    for name, grad in expected.items():
        assert grad is not None and mine[name] is not None, name
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_layer_graphs_run_the_self_attention_layer_only(folder, padded, monkeypatch):
    """The CUDA-graph code path (rehearsed eagerly on the CPU) takes layer 0 and leaves the cross layer to its own
    modules; the gradients stay transformers' + PEFT's. A padded batch too: its mask is read from the graphs'
    buffer (layer_graphs.StaticMasks), as the bench's padded vision batches are on the GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, reference, processor = _peft_pair(folder, "unsloth")
    decoder = model.get_base_model().model.language_model
    set_fast_path(model, True)
    decoder.runtime.offload_on_cpu, decoder.runtime.offload_min_tokens = True, 0
    decoder._graphs.cpu_rehearsal = True
    batch = UnslothVisionDataCollator(model, processor)(_rows()[:2] if padded else _rows()[:1])
    assert batch["attention_mask"].bool().all() != padded
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    (buffers,) = decoder._graphs.shapes.values()
    assert set(buffers.layers) == {0}
    assert buffers.layers[0].forward_calls == 1 and buffers.layers[0].backward_calls == 1
    assert bool(buffers.masks) == padded
    mine, expected = _grads(model), _grads(reference)
    for name, grad in expected.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("own_flag", [True, False], ids=["toggle", "decoder"])
def test_the_cross_layer_is_recomputed_once(folder, own_flag):
    """With checkpointing on, the cross-attention layer runs again in backward exactly once, whether transformers'
    toggle made it checkpoint itself (get_peft_model calls it) or our decoder checkpoints it (torch's non-reentrant
    checkpoint, its flag off); the LoRA gradients are transformers' + PEFT's either way."""
    model, reference, processor = _peft_pair(folder, True)
    layer = model.get_base_model().model.language_model.layers[1]
    assert layer.gradient_checkpointing is True  # transformers' toggle flagged it
    layer.gradient_checkpointing = own_flag
    calls = []
    hook = layer.input_layernorm.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    loss = model(**batch).loss
    forward_calls = len(calls)
    loss.backward()
    hook.remove()
    assert (forward_calls, len(calls)) == (1, 2)
    reference(**batch).loss.backward()
    mine, expected = _grads(model), _grads(reference)
    for name, grad in expected.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_greedy_generation_equals_transformers(folder, caplog):
    """generate(**processor(image, text)) after for_inference: transformers' loop over our model (the engine does
    not run cross-attention, and says so once), token for token transformers' own, with a left-padded text-only
    row beside the image row. The engine's loading arguments are refused with the reason."""
    with caplog.at_level(logging.WARNING, logger="velotune"):
        model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                           dtype=torch.float32, fast_inference=True)
    assert "fast_inference is for velotune's generation engine, which does not serve mllama" in caplog.text
    reference = _reference(folder).eval()
    batch = _prompt_batch(processor)
    assert batch["attention_mask"][1].eq(0).any()
    FastVisionModel.for_inference(model)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="velotune"):
        theirs = reference.generate(**batch, **settings)
        mine = model.generate(**batch, **settings)
    assert model.generation_engine.resident is None  # the engine did not run
    assert "transformers' loop, not velotune's engine" in caplog.text
    assert mine.shape[1] > batch["input_ids"].shape[1]
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_fast_generate_runs_the_generic_loop(folder, caplog):
    """fast_generate (vLLM's API, the GRPO notebooks' call) on the LoRA model: the engine's generic loop over our
    model's forward (text prompts), greedy tokens equal to transformers' generate of the same weights."""
    from velotune import SamplingParams

    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4)  # B = 0: the base model's outputs
    FastVisionModel.for_inference(model)
    ids = processor.tokenizer("hi there", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with caplog.at_level(logging.INFO, logger="velotune"):
        out = model.fast_generate([ids[0].tolist()], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert "generic loop over the model's forward, not the engine" in caplog.text
    with torch.no_grad():
        theirs = _reference(folder).eval().generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5,
                                                    do_sample=False)
    assert out[0].outputs[0].token_ids == theirs[0, ids.shape[1]:].tolist()


def test_a_cached_step_with_the_whole_cross_attention_mask_equals_transformers(folder):
    """A plain forward over a cache: the prompt but its last token, then the last token with the whole (B, T, images,
    tiles) mask and no image (the cross layer reads the image's keys/values from the cache): the mask is cut to the
    new token after the cached ones (what transformers 5.17's generate relies on), as transformers does."""
    reference = _reference(folder).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    batch = _prompt_batch(load_processor(folder, False), side="right")
    ids, mask, cross = batch["input_ids"][:1], batch["attention_mask"][:1], batch["cross_attention_mask"][:1]
    image = {k: batch[k][:1] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    results = []
    for model in (ours, reference):
        with torch.no_grad():
            first = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cross_attention_mask=cross[:, :-1],
                          use_cache=True, **image)
            name = "cache" if hasattr(first, "cache") else "past_key_values"  # transformers 5.2x / 5.17
            cache = getattr(first, name)
            assert cache.get_seq_length() == ids.shape[1] - 1
            step = model(input_ids=ids[:, -1:], attention_mask=mask, cross_attention_mask=cross, use_cache=True,
                         **{name: cache})
        results.append(step.logits)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the whole prompt at once gives the same last logits
        whole = ours(**{k: v[:1] for k, v in batch.items()}).logits[:, -1:]
    torch.testing.assert_close(results[0], whole, rtol=1e-5, atol=1e-5)


def test_module_tree_and_saves_are_transformers(folder, tmp_path):
    """Same parameter names, storage and linear layers as transformers' model (nothing copied); save_pretrained
    writes a folder transformers loads with equal logits (to fp32 rounding: our vision attention sums in another
    order, mllama_vision_attention.py); the merged 16-bit export of a LoRA model reloads in transformers with the
    LoRA model's logits."""
    reference = _reference(folder)
    names = {n: p.data_ptr() for n, p in reference.named_parameters()}
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    keys = set(reference.state_dict())
    model = MllamaForConditionalGeneration.adopt(reference).eval()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == names
    assert {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert set(model.state_dict()) == keys
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    # right padding: without position ids transformers counts padding into the positions, our decoder does not
    batch = _prompt_batch(load_processor(folder, False), side="right")
    real = batch["attention_mask"].bool()
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert type(loaded).__module__.startswith("transformers.")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits[real], model(**batch).logits[real], rtol=1e-5, atol=1e-5)

    lora, processor = tiny.lora_from_folder(folder)  # on the GPU where there is one
    lora.save_pretrained_merged(str(tmp_path / "merged"), processor)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        on_lora = {k: v.to(lora.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.testing.assert_close(merged(**batch).logits[real], lora(**on_lora).logits.cpu()[real], rtol=1e-5,
                                   atol=1e-5)


def test_the_vision_tower_keeps_only_the_layer_outputs_it_reads():
    """Four local vision layers, the tower reading layer 1's output: while the global layers run (no autograd graph,
    which would hold them all; under checkpointing it holds none), our tower holds layers 1 and 3 (the last is the
    encoder's output), transformers' all four; the graph of ours does not hold the aspect-ratio mask; the tower's
    output and gradients are transformers' (to fp32 rounding: the split attention sums in another order)."""
    reference, _ = tiny.build("mllama")
    config = reference.config
    config.vision_config.num_hidden_layers = 4
    config.vision_config.intermediate_layers_indices = [1]
    torch.manual_seed(0)
    theirs = type(reference)(config).eval()
    ours = MllamaForConditionalGeneration(config).eval()
    ours.load_state_dict(theirs.state_dict())
    vision = config.vision_config
    pixels = torch.randn(1, 1, vision.max_num_tiles, 3, vision.image_size, vision.image_size)
    inputs = dict(pixel_values=pixels, aspect_ratio_ids=torch.tensor([[6]]),
                  aspect_ratio_mask=torch.tensor([[[1, 1, 1, 0]]]))

    def run(model):
        tower = model.model.vision_model
        outputs = [None] * len(tower.transformer.layers)
        alive = []
        for index, layer in enumerate(tower.transformer.layers):
            layer.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, weakref.ref(out)))
        tower.global_transformer.layers[0].register_forward_pre_hook(
            lambda m, a: alive.append([i for i, ref in enumerate(outputs) if ref() is not None]))
        masks = []  # the aspect-ratio mask (B, 1, L, L) transformers' tower builds and hands its encoders
        tower.transformer.register_forward_pre_hook(
            lambda m, a, kw: masks.append(weakref.ref(kw["attention_mask"])), with_kwargs=True)
        with torch.no_grad():
            tower(**inputs)
        result = tower(**inputs).last_hidden_state
        mask = masks[-1]()
        mask_kept = mask is not None and mask.dim() == 4  # by the autograd graph, until the backward
        result.pow(2).sum().backward()
        return result, alive[0], {n: p.grad for n, p in tower.named_parameters()}, mask_kept

    ours_out, ours_alive, ours_grads, ours_mask = run(ours)
    theirs_out, theirs_alive, theirs_grads, theirs_mask = run(theirs)
    assert theirs_alive == [0, 1, 2, 3]  # what the change is about: transformers' encoder keeps every output
    assert ours_alive == [1]  # the read one (the last layer's output is released once normalised: mllama_tower.py)
    assert theirs_mask and not ours_mask  # our tower builds the (B, L) padding rows, never the (B, 1, L, L) mask
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_read_states_get_gradients_of_their_own():
    """The tower stacks the layer outputs it reads, so their gradients arrive as strided views of one buffer; our
    encoder hands them through OwnGradient, whose backward copies each into its own contiguous storage (same values),
    so the buffer is freed before the encoder's backward and each copy when its layer has used it."""
    stacked = torch.randn(6, 4, 3)  # a stack's gradient (..., H, states)
    x = torch.randn(6, 4, requires_grad=True)
    y = OwnGradient.apply(x)
    (grad,) = torch.autograd.grad(y, x, stacked[..., 1])
    assert grad.is_contiguous() and grad.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()
    torch.testing.assert_close(grad, stacked[..., 1])
    model, _ = tiny.build("mllama")
    model = MllamaForConditionalGeneration(model.config)
    tower, vision = model.model.vision_model, model.config.vision_config
    out = tower.transformer(torch.randn(1, vision.max_num_tiles * 8, vision.hidden_size, requires_grad=True))
    read = set(vision.intermediate_layers_indices)
    assert [i for i, h in enumerate(out.hidden_states) if h is not None] == sorted(read)
    assert all(type(out.hidden_states[i].grad_fn).__name__ == "OwnGradientBackward" for i in read)
    # made after the last layer's node, so autograd's engine (the ready node made last runs first) copies the
    # gradients out before any of these layers' backward
    last = out.last_hidden_state.grad_fn._sequence_nr()
    assert all(out.hidden_states[i].grad_fn._sequence_nr() > last for i in read)


@pytest.mark.parametrize("tiles", [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], None],
                         ids=["padded", "full", "empty", "unpadded"])
def test_split_vision_attention_equals_the_masked_one(tiles):
    """mllama_vision_attention.py: real queries over every key, padding queries over the real keys, against SDPA
    with transformers' aspect-ratio mask (padding patches in every tile; an unused tile; a padded image slot; an
    image without padding rows)."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    from velotune.models.mllama_vision_attention import image_rows, padding_rows, split_attention

    torch.manual_seed(0)
    tile, patches, heads = 8, 5, 2
    aspect = torch.tensor([tiles or [1, 1, 1, 1], [1, 0, 0, 0]])  # (B, tiles): the second image uses one tile
    mask = _prepare_aspect_ratio_attention_mask(aspect, num_patches=patches, target_length=tile, dtype=torch.float32)
    if tiles is None:  # the first image without a padding row (Mllama's tiles always have some; the code allows it)
        mask[0] = 0
    B, L = aspect.shape[0], aspect.shape[1] * tile
    q, k, v = (torch.randn(B, L, heads * 4, requires_grad=True) for _ in range(3))

    def split(t):
        return t.view(B, L, heads, 4).transpose(1, 2)

    expected = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, scale=0.5)
    expected = expected.transpose(1, 2).reshape(B, L, -1)
    padding = padding_rows(mask)  # (B, L)
    got = split_attention(q, k, v, padding, image_rows(padding), heads, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    for got_grad, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got_grad, want, rtol=1e-5, atol=1e-6)
    assert [r.real for r in image_rows(padding).images] == [sum(tiles) * patches if tiles else L, patches]


def test_a_gate_that_trains_keeps_the_mlp_value_in_recomputation():
    """A gated tower layer scales its MLP's output by tanh(gate): when the gate trains, its gradient needs that output,
    so the recomputation computes it; outside a recomputation it is always computed."""
    from velotune.models import foreign_checkpoints, tower_lora

    gate = torch.nn.Parameter(torch.ones(1))
    mlp = torch.nn.Module()
    mlp._velotune_gates = (gate,)
    assert not tower_lora._value_unused(mlp)
    with foreign_checkpoints._recomputation():
        assert not tower_lora._value_unused(mlp)
        gate.requires_grad_(False)
        assert tower_lora._value_unused(mlp)
    assert not tower_lora._value_unused(mlp)


@pytest.mark.parametrize("patches, padded", [(5, 8), (17, 24), (8, 8)])
def test_tile_padding_rows_are_the_diagonal_of_transformers_mask(patches, padded):
    """Our tower's padding rows (mllama_tower.py) against the diagonal of the mask transformers builds, including its
    no-padded-patch case (every row masked)."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    from velotune.models.mllama_tower import tile_padding_rows
    from velotune.models.mllama_vision_attention import padding_rows

    aspect = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    mask = _prepare_aspect_ratio_attention_mask(aspect, num_patches=patches, target_length=padded,
                                                dtype=torch.float32)
    assert torch.equal(tile_padding_rows(aspect, patches, padded), padding_rows(mask))


def test_cross_attention_keeps_the_key_value_heads_and_equals_transformers(monkeypatch):
    """Our cross-attention forward (mllama_cross_attention.py) on a grouped-query layer (4 query heads, 2 key/value
    heads): SDPA gets the 2 key/value heads as projected (no repeat), and the output and every gradient equal the
    class's forward, under a mask with masked tiles and a zeroed text row (as transformers prepares it)."""
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

    from velotune.models.mllama_cross_attention import install_cross_attention

    config = MllamaTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                              cross_attention_layers=[0], num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = MllamaTextCrossAttention(config, layer_idx=0)
    ours = MllamaTextCrossAttention(config, layer_idx=0)
    ours.load_state_dict(theirs.state_dict())
    layer = torch.nn.Module()
    layer.cross_attn = ours
    assert install_cross_attention([layer, torch.nn.Module()]) == 1
    hidden, states = torch.randn(2, 5, 32), torch.randn(2, 12, 32)
    mask = torch.zeros(2, 1, 5, 12)
    mask[:, :, :, 8:] = torch.finfo(torch.float32).min  # the last tile masked for every token
    mask[1, :, 0] = 0.0  # a text row before the image: transformers zeroes its mask (its output is zeroed later)
    keys = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, *a, **kw: keys.append(k.shape) or
                        sdpa(q, k, *a, **kw))
    results = []
    for module in (ours, theirs):
        x, s = hidden.clone().requires_grad_(), states.clone().requires_grad_()
        out, _ = module(x, cross_attention_states=s, attention_mask=mask)
        out.pow(2).sum().backward()
        results.append((out, x.grad, s.grad, {n: p.grad for n, p in module.named_parameters()}))
        module.zero_grad()
    assert keys[0] == (2, 2, 12, 8)  # ours: the 2 key/value heads (transformers repeats them to 4)
    (out, dx, ds, grads), (ref, rdx, rds, rgrads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-6)
    for name, grad in rgrads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
