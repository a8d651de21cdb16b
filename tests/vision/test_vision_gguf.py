"""GGUF export of vision-language models (issue 20 item 5): the language model as llama.cpp's `qwen2vl`
architecture plus the `mmproj` file of the vision tower and projector, for Qwen2-VL and Qwen2.5-VL.

Tiny random models with LoRA on both towers (random B, so merging matters), a byte-level BPE tokenizer (the
GGUF vocabulary needs BPE) with Qwen's vision tokens, three vision blocks (llama.cpp's converter numbers the
projector's `mm.2` from the block table, so it needs three) and Qwen2.5-VL's 112-pixel window (clip.cpp's
fixed window). What is checked: llama.cpp (llama-cpp-python) runs the language model's file with the model's
text logits; the mmproj file holds every key clip.cpp reads and every tensor byte for byte (the temporal patch
kernel split into its two frames, q/k/v split from the fused qkv); a damaged tensor is named; where
llama-cpp-python has its multimodal library (mtmd), llama.cpp's image embeddings equal the model's; the
configurations clip.cpp cannot run are refused before any file is written.

The mmproj layout was also compared, outside this test, with llama.cpp's own converter
(convert_hf_to_gguf.py --mmproj of the vendored llama.cpp, on the merged folder under the hub's tensor names):
every tensor byte-identical, the keys equal but for general.name and general.size_label.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers as T
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from velotune.export.gguf_check import GGUFContentError
from velotune.export.gguf_mmproj import MmprojUnsupported, check_mmproj
from velotune.export.mtmd_check import (EMBEDDING_BUDGET, check_image_embeddings, llama_cpp_prompt_logits,
                                        mtmd_available, probe_image)
from velotune.export.verify import llama_cpp_logits
from velotune.vision.processors import image_only_processor

from tiny import export_shapes
from tiny import vision as tiny_vision
from tiny.vision import gguf_fields, lora_from_folder

pytest.importorskip("llama_cpp")

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
F16_ATOL = 2e-2  # llama.cpp's fp16 KV cache and activations (tests/export/test_llama_cpp.py)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tokenizer():
    tok = export_shapes.tokenizer()  # byte-level BPE with ChatML's tokens
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = tiny_vision.TEMPLATES["qwen2_vl"]
    return tok


def _build(family: str, window_size: int = 112):
    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids
    # rope_theta 10: with 10000 and a head of 8 the height/width sections' frequencies are ~1e-3, so image
    # positions hardly mattered (a file with all sections temporal answered within 9e-3 of the model); at 10
    # wrong sections move the image prompt's logits by 0.4-1.7, the right file stays within 5e-3
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10.0})
    # initializer_range 0.2, not 0.02: near-zero weights make attention uniform, and llama.cpp's embeddings from a
    # file with block 0's q and k swapped were then within 2e-3 of the model's; at 0.2 that file is off by 0.2-0.3
    # and one with the wrong window pattern by 0.1 (relative), while the right file is within 7e-4
    vision = dict(depth=3, hidden_size=32, num_heads=2, patch_size=8, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3, initializer_range=0.2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
        config_cls, processor_cls = T.Qwen2VLConfig, T.Qwen2VLProcessor
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=window_size, fullatt_block_indexes=[1])
        config_cls, processor_cls = T.Qwen2_5_VLConfig, T.Qwen2_5_VLProcessor
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 256, "longest_edge": 64 * 64 * 4}, patch_size=8,
                                               temporal_patch_size=2, merge_size=2)
    processor = image_only_processor(processor_cls)(image_processor=image_processor, tokenizer=tok,
                                                    chat_template=tok.chat_template)
    torch.manual_seed(0)
    return T.AutoModelForImageTextToText.from_config(config).eval(), processor


def _trained(family: str, folder, **build):
    reference, processor = _build(family, **build)
    reference.save_pretrained(folder)
    processor.save_pretrained(folder)
    return lora_from_folder(folder)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, model, processor, [model-F16.gguf, mmproj-F16.gguf]); the export runs its own checks."""
    family = request.param
    model, processor = _trained(family, tmp_path_factory.mktemp(f"{family}_hf"))
    paths = model.save_pretrained_gguf(tmp_path_factory.mktemp(f"{family}_gguf"), processor,
                                       quantization_method="f16")
    return family, model, processor, paths


def test_language_model_runs_in_llama_cpp_as_qwen2vl(exported):
    family, model, processor, (text_path, mmproj) = exported
    assert (text_path.name, mmproj.name) == ("model-F16.gguf", "mmproj-F16.gguf")
    fields = gguf_fields(gguf.GGUFReader(text_path))
    assert fields["general.architecture"] == "qwen2vl"
    assert fields["qwen2vl.rope.dimension_sections"] == [2, 1, 1, 0]
    prompts = [processor.tokenizer("What is the capital of France?")["input_ids"], [5, 9, 200, 31, 7, 64]]
    with torch.no_grad():  # the vision-language model itself, text only (M-RoPE ids equal on the three axes)
        ours = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
    for mine, cpp in zip(ours, llama_cpp_logits(text_path, prompts)):
        assert (mine - cpp).abs().max() < F16_ATOL, family
        assert torch.equal(mine.argmax(-1), cpp.argmax(-1))


def test_mmproj_holds_what_clip_cpp_reads(exported):
    family, model, processor, (_, mmproj) = exported
    reader = gguf.GGUFReader(mmproj)
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}[family]
    assert fields["clip.vision.projection_dim"] == 32 and fields["clip.vision.block_count"] == 3
    assert fields["clip.vision.patch_size"] == 8 and fields["clip.vision.attention.head_count"] == 2
    assert fields["clip.vision.image_mean"] == pytest.approx(list(processor.image_processor.image_mean))
    assert fields.get("clip.use_silu", False) == (family == "qwen2_5_vl")
    assert fields.get("clip.vision.n_wa_pattern") == (2 if family == "qwen2_5_vl" else None)
    tensors = {t.name: t for t in reader.tensors}
    blocks = {f"v.blk.{i}.{p}.{k}" for i in range(3) for p in ("attn_q", "attn_k", "attn_v", "attn_out")
              for k in ("weight", "bias")}
    assert blocks | {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight",
                     "mm.2.weight"} <= set(tensors)
    assert not any("qkv" in name for name in tensors)
    assert tensors["v.blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["v.blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    # the Conv3d patch kernel (C, 3, 2, p, p), LoRA-free, split into its two temporal frames
    kernel = model.get_base_model().model.visual.patch_embed.proj.weight.detach()
    for frame, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
        stored = torch.from_numpy(tensors[name].data.astype("float32")).reshape(32, 3, 8, 8)
        torch.testing.assert_close(stored, kernel[:, :, frame].half().float(), rtol=0, atol=0)
    # q of block 0 is the first third of the merged (base + LoRA) qkv weight
    qkv = model.get_base_model().model.visual.blocks[0].attn.qkv
    merged = qkv.base_layer.weight + qkv.get_delta_weight("default")  # (96, 32)
    stored = torch.from_numpy(tensors["v.blk.0.attn_q.weight"].data.astype("float32")).reshape(32, 32)
    torch.testing.assert_close(stored, merged[:32].detach().half().float(), rtol=0, atol=0)


def test_damaged_mmproj_tensor_is_named(exported, tmp_path):
    family, model, processor, (_, mmproj) = exported
    damaged = tmp_path / mmproj.name
    data = bytearray(mmproj.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(mmproj).tensors if t.name == "v.blk.1.ffn_down.weight")
    start = int(tensor.data_offset)
    data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
    damaged.write_bytes(bytes(data))
    check_mmproj(model, mmproj, processor.image_processor)  # the file as written passes
    with pytest.raises(GGUFContentError, match="v.blk.1.ffn_down.weight"):
        check_mmproj(model, damaged, processor.image_processor)


@pytest.mark.skipif(not mtmd_available(), reason="llama-cpp-python was built without its multimodal library (mtmd)")
def test_llama_cpp_image_embeddings_equal_the_model(exported):
    family, model, processor, (text_path, mmproj) = exported
    assert check_image_embeddings(model, text_path, mmproj, processor.image_processor) < EMBEDDING_BUDGET


@pytest.mark.skipif(not mtmd_available(), reason="llama-cpp-python was built without its multimodal library (mtmd)")
def test_llama_cpp_answers_an_image_prompt_like_the_model(exported):
    """The two files together in llama.cpp: chat prompt with the probe image, next-token logits after it (the
    image's embeddings at llama.cpp's own M-RoPE positions, then text after them) equal the model's."""
    from llama_cpp import mtmd_cpp

    family, model, processor, (text_path, mmproj) = exported
    image = probe_image(model, processor.image_processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[[image]], do_resize=False, add_special_tokens=False, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    marker = mtmd_cpp.mtmd_default_marker().decode()
    # mtmd writes <|vision_start|> / <|vision_end|> around the image itself (tools/mtmd/mtmd.cpp)
    cpp_prompt = prompt.replace("<|vision_start|><|image_pad|><|vision_end|>", marker)
    tokens, cpp = llama_cpp_prompt_logits(text_path, mmproj, cpp_prompt, image)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tokens == [i for i in ids if i != pad]  # the same text tokens around the image
    with torch.no_grad():
        ours = model(**batch).logits[0, -1].float()  # (V,)
    assert (ours - cpp).abs().max() < F16_ATOL
    assert int(ours.argmax()) == int(cpp.argmax())


def test_configurations_clip_cpp_cannot_run_are_refused_before_writing(tmp_path):
    model, processor = _trained("qwen2_5_vl", tmp_path / "hf", window_size=16)
    out = tmp_path / "gguf"
    with pytest.raises(MmprojUnsupported, match="window_size=16 .*uses 112"):
        model.save_pretrained_gguf(out, processor, quantization_method="f16")
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ValueError, match="needs the processor"):
        model.save_pretrained_gguf(out, processor.tokenizer, quantization_method="f16")
