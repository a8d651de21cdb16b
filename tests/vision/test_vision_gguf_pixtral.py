"""GGUF export of Llava with a Pixtral tower (Pixtral-12B's layout; issue 20 item 5): the language model (Mistral,
llama.cpp's `llama` architecture, on velotune's decoder) plus the `mmproj` file of the Pixtral tower and Llava's
projector, with the [IMG_BREAK] token's embedding that llama.cpp puts between rows of patches.

A tiny random model with LoRA on both towers (random B, so merging matters), a SentencePiece-style BPE tokenizer
with Pixtral's [IMG] / [IMG_BREAK] / [IMG_END] tokens, and the PIL Pixtral image processor. CI has no
torchvision, which transformers' PixtralProcessor requires, so the folder holds the tokenizer and the image
processor and loads with a LlavaProcessor (it supplies the tokenizer and the image mean/std the export reads);
the image prompt for the whole-model check is laid out as Pixtral's processor does it: each row of patches as
[IMG] tokens followed by [IMG_BREAK], the last row's by [IMG_END].

What is checked: llama.cpp runs the language model's file with the model's text logits; the mmproj holds every
key clip.cpp reads and the tensors as llama.cpp's converter writes them (q/k rows interleaved per head for
clip.cpp's 2-D rope on adjacent pairs, [IMG_BREAK]'s embedding row); where llama-cpp-python has its multimodal
library (mtmd), llama.cpp's image embeddings (patch rows with [IMG_BREAK] between them) equal the model's, and
the image prompt's next-token logits equal the model's; a CLIP-tower Llava is still refused, naming the
supported families; configurations clip.cpp cannot run are refused before any file is written.
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from velotune import FastVisionModel
from velotune.export.gguf_arch import _interleave_heads
from velotune.export.gguf_mmproj import MmprojUnsupported
from velotune.export.mtmd_check import (EMBEDDING_BUDGET, check_image_embeddings, llama_cpp_prompt_logits,
                                        mtmd_available, probe_image)
from velotune.export.verify import llama_cpp_logits

from tiny import export_shapes
from tiny import vision as tiny_vision
from tiny.vision import gguf_fields, gguf_tensor, lora_from_folder

pytest.importorskip("llama_cpp")

F16_ATOL = 2e-2  # llama.cpp's fp16 KV cache and activations (tests/export/test_llama_cpp.py)
PIXTRAL_TOKENS = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
needs_mtmd = pytest.mark.skipif(not mtmd_available(),
                                reason="llama-cpp-python was built without its multimodal library (mtmd)")


def _tokenizer() -> PreTrainedTokenizerFast:
    spec = json.loads(export_shapes.sentencepiece_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"]["prepend_scheme"] = "never"  # no space put before text that follows a special token
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": PIXTRAL_TOKENS})
    tok.chat_template = tiny_vision.TEMPLATES["llava"].replace("<image>", "[IMG]")
    return tok


def _trained(folder, act: str = "silu", strategy: str = "full", layers: int = 2):
    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids
    # rope_theta 10 in the text model: positions matter at a head of 8 (as in test_vision_gguf.py)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                initializer_range=0.2, pad_token_id=ids("<pad>"), sliding_window=None, rope_theta=10.0)
    # image_size 128: transformers' 2-D rope table covers image_size / patch_size = 16 patches a side (the probe is
    # 16 x 4 patches)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, head_dim=16, image_size=128, patch_size=8, hidden_act=act,
                  initializer_range=0.2)
    config = T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=ids("[IMG]"),
                           vision_feature_layer=-1, vision_feature_select_strategy=strategy,
                           projector_hidden_act="gelu")
    torch.manual_seed(0)
    T.AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    PixtralImageProcessorPil(size={"longest_edge": 128}, patch_size=8).save_pretrained(folder)
    return lora_from_folder(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, processor, [model-F16.gguf, mmproj-F16.gguf]); the export runs its own checks."""
    model, processor = _trained(tmp_path_factory.mktemp("pixtral_hf"))
    paths = model.save_pretrained_gguf(tmp_path_factory.mktemp("pixtral_gguf"), processor, quantization_method="f16")
    return model, processor, paths


def test_language_model_runs_in_llama_cpp(exported):
    model, processor, (text_path, mmproj) = exported
    assert gguf_fields(gguf.GGUFReader(text_path))["general.architecture"] == "llama"
    prompts = [processor.tokenizer("What is the capital of France?")["input_ids"], [5, 9, 200, 31, 7, 64]]
    with torch.no_grad():
        ours = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
    for mine, cpp in zip(ours, llama_cpp_logits(text_path, prompts)):
        assert (mine - cpp).abs().max() < F16_ATOL
        assert torch.equal(mine.argmax(-1), cpp.argmax(-1))


def test_mmproj_holds_what_clip_cpp_reads(exported):
    model, processor, (_, mmproj) = exported
    reader = gguf.GGUFReader(mmproj)
    fields = gguf_fields(reader)
    assert fields["clip.projector_type"] == "pixtral" and fields["clip.use_silu"] is True
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["clip.vision.projection_dim"] == 32 and fields["clip.vision.block_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert {"v.patch_embd.weight", "v.pre_ln.weight", "v.blk.0.ffn_gate.weight", "mm.1.weight", "mm.2.bias",
            "v.token_embd.img_break"} <= set(tensors)
    assert not any(n.startswith(("token_embd", "blk.", "output")) for n in tensors)
    base = model.get_base_model()
    q = base.model.vision_tower.transformer.layers[0].attention.q_proj
    merged = (q.base_layer.weight + q.get_delta_weight("default")).detach()  # (32, 32), LoRA merged
    torch.testing.assert_close(gguf_tensor(tensors["v.blk.0.attn_q.weight"]), _interleave_heads(merged, 2).half().float(),
                               rtol=0, atol=0)
    row = base.get_input_embeddings().weight[processor.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")].detach()
    torch.testing.assert_close(gguf_tensor(tensors["v.token_embd.img_break"]), row, rtol=0, atol=0)


def test_clip_tower_llava_is_still_refused(vision_folder, tmp_path):
    model, processor = FastVisionModel.from_pretrained(str(vision_folder("llava")), load_in_4bit=False,
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    with pytest.raises(NotImplementedError, match=r"'llava' \(vision tower 'clip_vision_model'\) .*llava \(with a pixtral vision tower\)"):
        model.save_pretrained_gguf(tmp_path / "gguf", processor, quantization_method="f16")


@pytest.mark.parametrize("change, message", [(dict(act="gelu_pytorch_tanh"), "hidden_act='gelu_pytorch_tanh'"),
                                             (dict(strategy="default"), "select_strategy='default'")])
def test_configurations_clip_cpp_cannot_run_are_refused_before_writing(tmp_path, change, message):
    model, processor = _trained(tmp_path / "hf", **change)
    out = tmp_path / "gguf"
    with pytest.raises(MmprojUnsupported, match=message):
        model.save_pretrained_gguf(out, processor, quantization_method="f16")
    assert not out.exists() or not any(out.iterdir())


@needs_mtmd
def test_llama_cpp_image_embeddings_equal_the_model(exported):
    model, processor, (text_path, mmproj) = exported
    error = check_image_embeddings(model, text_path, mmproj, processor.image_processor, processor.tokenizer)
    assert error < EMBEDDING_BUDGET


@needs_mtmd
def test_llama_cpp_answers_an_image_prompt_like_the_model(exported):
    """The two files together in llama.cpp: the probe image in a chat prompt, next-token logits after it."""
    from llama_cpp import mtmd_cpp

    model, processor, (text_path, mmproj) = exported
    tok = processor.tokenizer
    image = probe_image(model, processor.image_processor)
    pixels = processor.image_processor(images=[image], do_resize=False, return_tensors="pt")
    rows, columns = image.height // 8, image.width // 8
    marker = mtmd_cpp.mtmd_default_marker().decode()
    before, after = "<s>[INST]", "What is in the image?[/INST]"
    ids = tok(before, add_special_tokens=False)["input_ids"]
    for r in range(rows):  # Pixtral's layout of the image tokens
        ids += [tok.convert_tokens_to_ids("[IMG]")] * columns
        ids.append(tok.convert_tokens_to_ids("[IMG_END]" if r == rows - 1 else "[IMG_BREAK]"))
    ids += tok(after, add_special_tokens=False)["input_ids"]
    tokens, cpp = llama_cpp_prompt_logits(text_path, mmproj, before + marker + after, image)
    # mtmd's text tokens: the prompt's, without the image's [IMG] / [IMG_BREAK] (its embeddings) but with
    # [IMG_END], which mtmd writes after the image itself
    image_only = {tok.convert_tokens_to_ids("[IMG]"), tok.convert_tokens_to_ids("[IMG_BREAK]")}
    assert tokens == [i for i in ids if i not in image_only]
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"],
                     image_sizes=pixels["image_sizes"]).logits[0, -1].float()  # (V,)
    assert (ours - cpp).abs().max() < F16_ATOL
    assert int(ours.argmax()) == int(cpp.argmax())
