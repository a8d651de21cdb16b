"""Vision-language models on velotune's own text decoder (models/composite.py: Qwen2-VL, Qwen2.5-VL, Llava with a
Mistral text model, Mllama, whose cross-attention layers test_mllama_own_decoder.py covers further): the composite
forward equals transformers' model of the same weights (logits, loss, gradients; a batch with an image row and a
padded text-only row), the adopted model shares transformers' tensors, a bnb-4bit folder loads, "unsloth"
checkpointing reaches our decoder, the fast path equals the plain path, and greedy generation (transformers' loop,
and velotune's engine after for_inference) equals transformers' generate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from velotune import FastVisionModel
from velotune.models import tower_lora
from velotune.models.decoder import DecoderModel
from velotune.models.vision_lm import OWN_DECODER_CLASSES
from velotune.vision.families import family_of
from velotune.vision.processors import load_processor

FAMILIES = tuple(OWN_DECODER_CLASSES)
# The families velotune's generation engine serves (their prefill: `prefill_inputs`); Mllama's cross-attention layers
# are not, its generate runs transformers' loop (tests/vision/test_mllama_own_decoder.py)
ENGINE_FAMILIES = tuple(f for f, cls in OWN_DECODER_CLASSES.items() if hasattr(cls, "prefill_inputs"))


def _batch(processor, answer=True):
    image = Image.new("RGB", (40, 28), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    if answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "red"}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)
    return mixed_batch(processor, text, "hi there", image)


def mixed_batch(processor, text: str, short: str, image):
    """`text` with `image` and the shorter `short` without one, padded. transformers 5.17's Mllama processor refuses
    a batch where some rows have images and others none: there `short` gets the image too."""
    try:
        return processor(text=[text, short], images=[[image], []], add_special_tokens=False, return_tensors="pt",
                         padding=True)
    except ValueError:
        return processor(text=[text, processor.image_token + short], images=[[image], [image]],
                         add_special_tokens=False, return_tensors="pt", padding=True)


def _pair(folder):
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    ours = OWN_DECODER_CLASSES[reference.config.model_type].from_pretrained(folder, dtype=torch.float32)
    return ours, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_equal_transformers(family, vision_folder):
    folder = vision_folder(family)
    ours, reference = _pair(folder)
    assert isinstance(ours.model.language_model, DecoderModel)
    batch = _batch(load_processor(folder, False))
    assert batch["attention_mask"][1].eq(0).any()  # the text-only row is padded
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outputs = []
    for model in (ours, reference):
        model.train()  # dropout is 0 in the tiny configs; train mode takes the training path (no cache)
        out = model(**batch, labels=labels, return_logits=True) if model is ours else model(**batch, labels=labels)
        out.loss.backward()
        outputs.append(out)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs[0].logits[real], outputs[1].logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-6, atol=1e-6)
    theirs = dict(reference.named_parameters())
    projector = "model." + family_of(family).projector + "."
    projector_weight = next(n for n in theirs if n.startswith(projector) and n.endswith("weight"))
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.down_proj"
                 ".weight", "model.language_model.embed_tokens.weight", projector_weight):
        ours_grad = ours.get_parameter(name).grad
        torch.testing.assert_close(ours_grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_adoption_shares_transformers_tensors_and_saves_for_transformers(vision_folder, tmp_path):
    reference = AutoModelForImageTextToText.from_pretrained(vision_folder("qwen2_vl"), dtype=torch.float32)
    before = {name: p.data_ptr() for name, p in reference.named_parameters()}
    model = OWN_DECODER_CLASSES["qwen2_vl"].adopt(reference).eval()
    after = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert after == before  # same names, same storage: nothing copied
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded).__module__.startswith("transformers.")
    batch = _batch(load_processor(vision_folder("qwen2_vl"), False))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_a_bnb_4bit_folder_loads_onto_our_decoder(vision_folder, tmp_path):
    """A prequantized ("bnb-4bit") Qwen2-VL folder: transformers builds bitsandbytes' layers, adoption moves them
    into our decoder, velotune adopts them as NF4Linear; logits equal transformers' 4-bit model's."""
    import shutil

    from transformers import BitsAndBytesConfig

    from velotune.export.verify import same_on_every_cpu
    from velotune.quant import is_linear4bit

    folder = vision_folder("qwen2_vl")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head",
                                                                                                     "visual"])
    quantized = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config, device_map="cpu")
    quantized.save_pretrained(tmp_path)
    for item in folder.iterdir():
        if not item.name.startswith(("model", "config")):  # the processor's and tokenizer's files
            shutil.copy(item, tmp_path)
    model, processor = FastVisionModel.from_pretrained(str(tmp_path), device_map="cpu")
    assert isinstance(model.model.language_model, DecoderModel)
    assert is_linear4bit(model.model.language_model.layers[1].self_attn.v_proj)
    # The same result on every CPU (docs/decisions.md, Loading): the reference computes velotune's NF4 math as the
    # export check does (bitsandbytes' AVX512 CPU kernels differ where blocks straddle rows, export/verify.py says
    # why); ours must not repack even where bitsandbytes would
    same_on_every_cpu(quantized)
    for module in model.modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = True
    batch = _batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, quantized(**batch).logits, rtol=1e-5, atol=1e-5)


def test_unsloth_checkpointing_reaches_our_decoder(vision_folder):
    model, _ = FastVisionModel.from_pretrained(str(vision_folder("qwen2_vl")), load_in_4bit=False, device_map="cpu")
    model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    decoder = model.get_base_model().model.language_model
    assert decoder.runtime.checkpointing == "unsloth"
    assert model.get_base_model().model.visual.gradient_checkpointing  # transformers' toggle for the tower


def test_greedy_generation_in_transformers_loop_equals_transformers(vision_folder):
    folder = vision_folder("qwen2_vl")
    ours, reference = _pair(folder)
    processor = load_processor(folder, False)
    processor.tokenizer.padding_side = "left"
    batch = _batch(processor, answer=False)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = reference.eval().generate(**batch, **settings)
        mine = ours.eval().generate(**batch, **settings)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_greedy_generation_on_the_engine_equals_transformers(family, vision_folder):
    """After for_inference, generate(**processor(...)) runs on velotune's engine: prefill with the image
    features and M-RoPE ids, text-only decode steps counting on from each row's rope delta. Rows: one image,
    text only, two images of other sizes (so the rows' deltas differ), left-padded."""
    folder = vision_folder(family)
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu")
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor.tokenizer.padding_side = "left"
    red, green = Image.new("RGB", (40, 28), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 130, 30))

    def prompt(images: int) -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": "Colour?"}]
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    batch = processor(text=[prompt(1), "hi there", prompt(2)], images=[[red], [], [green, red]],
                      add_special_tokens=False, return_tensors="pt", padding=True)
    FastVisionModel.for_inference(model)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = reference.generate(**batch, **settings)
        mine = model.generate(**batch, **settings)
    assert model.generation_engine.resident is not None  # the engine ran (it keeps its cache)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    FastVisionModel.for_training(model)
    assert model.generation_engine.resident is None


def fused_calls(monkeypatch) -> list[int]:
    """The number of projections of each call through tower_lora's fused LoRA (transformers' layers on our fast
    path; a whole MLP as one call of its 2 or 3 projections), in call order, from now on."""
    calls = []

    def spy(name: str, count):
        function = getattr(tower_lora, name)

        def counted(x, *args, **kwargs):
            calls.append(count(args))
            return function(x, *args, **kwargs)

        monkeypatch.setattr(tower_lora, name, counted)

    spy("lora_projections", lambda args: len(args[0]))
    spy("lora_plain_mlp", lambda args: 2)  # fc1, fc2
    spy("lora_mlp", lambda args: 3)  # gate, up, down
    return calls


def mlp_value_flags(monkeypatch) -> list[bool]:
    """The `value_unused` each fused tower MLP call gets (tower_lora.py: True in a layer's recomputation under the
    offloading checkpoint, whose MLP then computes nothing in forward), in call order, from now on."""
    flags = []
    for name in ("lora_plain_mlp", "lora_mlp"):
        function = getattr(tower_lora, name)

        def recorded(*args, function=function, **kwargs):
            flags.append(kwargs.get("value_unused", False))
            return function(*args, **kwargs)

        monkeypatch.setattr(tower_lora, name, recorded)
    return flags


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fast_path_equals_the_plain_path(family, vision_folder, monkeypatch):
    """The fast path forced on the CPU (fused LoRA and loss through their reference paths, the offloading
    checkpoint on host copies) gives the plain path's loss and LoRA gradients, and never builds the logits.
    The kernel ops run their PyTorch references (Triton's interpreter costs seconds per step; tests/kernels
    checks each kernel against its reference)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from velotune import UnslothVisionDataCollator

    from .test_collator import _rows

    model, processor = FastVisionModel.from_pretrained(str(vision_folder(family)), load_in_4bit=False,
                                                       device_map="cpu")
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    FastVisionModel.for_training(model)
    batch = UnslothVisionDataCollator(model, processor)(_rows()[:1])
    runtime = model.get_base_model().model.language_model.runtime
    runtime.offload_on_cpu, runtime.offload_min_tokens = True, 0
    results, fused, flags = {}, fused_calls(monkeypatch), mlp_value_flags(monkeypatch)
    for fast in (False, True):
        runtime.fast_path = fast
        out = model(**batch)
        if not fast:
            assert fused == []
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast] = out, grads
        model.zero_grad(set_to_none=True)
    # qkv, proj, then the MLP as one node (fc1 and fc2 for Qwen2-VL, gate, up and down for Qwen2.5-VL) of the tiny
    # tower's 2 blocks
    block = [1, 1, 2] if family == "qwen2_vl" else [1, 1, 3]
    assert fused[:2 * len(block)] == block * 2
    assert flags == [False, False, True, True]  # the 2 blocks' forward, then their recomputations (values unused)
    (plain, plain_grads), (fast, fast_grads) = results[False], results[True]
    assert plain.logits is not None and fast.logits is None  # the fused cross-entropy ran
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    # A and B of each LoRA layer: 14 text, the merger's 2, and 4 (Qwen2-VL) or 5 (Qwen2.5-VL) a vision block
    per_block = 4 if family == "qwen2_vl" else 5
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) == 2 * (16 + 2 * per_block)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_fast_path_on_cuda_equals_the_plain_path(vision_folder, monkeypatch, load_in_4bit):
    """On the GPU the compiled kernels (fused LoRA over NF4 or bf16 weights, fused cross-entropy, offloaded
    checkpoints) against the plain path of the same model, within the bf16 tolerances (DESIGN.md section 5)."""
    from velotune import UnslothVisionDataCollator

    from .test_collator import _rows

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CUDA tensors take the compiled kernels
    model, processor = FastVisionModel.from_pretrained(str(vision_folder("qwen2_5_vl")), load_in_4bit=load_in_4bit)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    FastVisionModel.for_training(model)
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    runtime = model.get_base_model().model.language_model.runtime
    runtime.offload_min_tokens = 0
    results = {}
    for fast in (False, True):
        runtime.fast_path = fast
        out = model(**batch)
        out.loss.backward()
        results[fast] = out, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    (plain, plain_grads), (fast, fast_grads) = results[False], results[True]
    assert fast.logits is None
    torch.testing.assert_close(fast.loss.float(), plain.loss.float(), rtol=5e-2, atol=5e-2)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (fast_grads[name] - grad).abs().max() / scale < 0.1, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_greedy_on_cuda_equals_transformers(vision_folder, monkeypatch):
    """The engine on CUDA (fused prefill with (3, B, P) M-RoPE ids, decode GEMV kernels, CUDA graphs), fp32 with
    TF32 off, against transformers' generate of the same weights on the same GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    folder = vision_folder("qwen2_vl")
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    processor.tokenizer.padding_side = "left"
    batch = _batch(processor, answer=False).to("cuda")
    FastVisionModel.for_inference(model)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = reference.generate(**batch, **settings)
        mine = model.generate(**batch, **settings)
    assert model.generation_engine.resident is not None
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_inference_arguments_reach_the_engine(vision_folder, caplog):
    import logging

    model, _ = FastVisionModel.from_pretrained(str(vision_folder("qwen2_vl")), load_in_4bit=False, device_map="cpu",
                                               fast_inference=True, gpu_memory_utilization=0.3, max_lora_rank=8)
    settings = model.generation_engine.settings
    assert (settings.fast_inference, settings.gpu_memory_utilization, settings.max_lora_rank) == (True, 0.3, 8)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        FastVisionModel.from_pretrained(str(vision_folder("gemma3")), load_in_4bit=False, device_map="cpu",
                                        fast_inference=True)
    assert "fast_inference is for velotune's generation engine, which does not serve gemma3" in caplog.text
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5"):
        FastVisionModel.from_pretrained(str(vision_folder("qwen2_vl")), gpu_memory_utilization=1.5)
