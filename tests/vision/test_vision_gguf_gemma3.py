"""GGUF export of Gemma 3 (issue 20 item 5): the language model as llama.cpp's `gemma3` architecture plus the
`mmproj` file of the SigLIP tower and Gemma 3's projector (average pool, soft-embedding RMSNorm, input projection).

A tiny random Gemma 3 with LoRA on both towers (random B, so merging matters), a SentencePiece-style BPE
tokenizer with Gemma's turn and image tokens (the GGUF vocabulary needs BPE), a 64-px image of 8 x 8 patches
pooled by 2 into 16 tokens (real Gemma 3 pools 64 x 64 patches by 4, clip.cpp's default: the kernel here makes
the file carry `clip.vision.projector.scale_factor`), and random projector weights (transformers initializes the
input projection to zeros). query_pre_attn_scalar equals head_dim, as in every released Gemma 3 but the 27B:
llama.cpp ignores that field (it scales attention by head_dim, or hidden / heads for the 27B; a tiny text model
with transformers' default 256 over a head of 8 answered with a mean KL of 0.13 in llama.cpp).

What is checked: llama.cpp runs the language model's file with the model's text logits; the mmproj file holds
every key clip.cpp reads and every tensor as the converter writes it (F32 embeddings, F16 input projection, the
soft-embedding norm as 1 + w, LoRA merged into the tower); a real-size config gets no scale-factor key; where
llama-cpp-python has its multimodal library (mtmd), llama.cpp's image embeddings equal the model's and a whole
image prompt's next-token logits equal the model's (image tokens attending both ways on both sides), and a file
with the norm stored as w is caught; configurations clip.cpp cannot run are refused before any file is written.

The mmproj layout was also compared, outside this test, with llama.cpp's own converter (convert_hf_to_gguf.py
--mmproj of the vendored llama.cpp, --outtype f16 and f32, on the merged folder under the hub's tensor names
`vision_tower.vision_model.*`): every tensor byte-identical, the keys equal (and in the same order) but for
general.name and general.size_label.
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from velotune.export.gguf_mmproj import MmprojUnsupported
from velotune.export.mmproj_gemma3 import write_keys
from velotune.export.mtmd_check import (EMBEDDING_BUDGET, ImageEmbeddingMismatch, check_image_embeddings,
                                        llama_cpp_prompt_logits, mtmd_available, probe_image)
from velotune.export.verify import llama_cpp_logits
from velotune.models.spec import PROJECTORS

from tiny import export_shapes
from tiny import vision as tiny_vision
from tiny.vision import gguf_fields, gguf_tensor, lora_from_folder

pytest.importorskip("llama_cpp")

F16_ATOL = 2e-2  # llama.cpp's fp16 KV cache and activations (tests/export/test_llama_cpp.py)
IMAGE_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
needs_mtmd = pytest.mark.skipif(not mtmd_available(),
                                reason="llama-cpp-python was built without its multimodal library (mtmd)")


def _tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's kind: SentencePiece-style BPE with byte fallback and no space put before the text (llama.cpp's
    converter writes add_space_prefix false for Gemma 3; with "first", transformers and llama.cpp disagree about a
    prefix after special tokens)."""
    spec = json.loads(export_shapes.sentencepiece_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"]["prepend_scheme"] = "never"
    core = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens=IMAGE_TOKENS)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", *IMAGE_TOKENS.values()]})
    tok.chat_template = tiny_vision.TEMPLATES["gemma3"]
    return tok


def _config(tok, image_size: int = 64, patch_size: int = 8, tokens: int = 16, act: str = "gelu_pytorch_tanh"):
    ids = tok.convert_tokens_to_ids
    # initializer_range 0.2 (as tests/vision/test_vision_gguf.py): near-zero weights make attention uniform and
    # hide a wrong layout
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=512,
                sliding_window=64, initializer_range=0.2, pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"),
                eos_token_id=ids("</s>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, vision_use_head=False, hidden_act=act)
    return T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                          image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"), initializer_range=0.2)


def _trained(folder, **config):
    tok = _tokenizer()
    config = _config(tok, **config)
    size = config.vision_config.image_size
    processor = T.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                                  tokenizer=tok, image_seq_length=config.mm_tokens_per_image,
                                  chat_template=tok.chat_template)
    torch.manual_seed(0)
    reference = T.AutoModelForImageTextToText.from_config(config).eval()
    projector = reference.model.multi_modal_projector
    with torch.no_grad():  # transformers starts the input projection at zero and the norm at its identity
        projector.mm_input_projection_weight.normal_(0, 0.2)
        projector.mm_soft_emb_norm.weight.normal_(0, 0.2)
    reference.save_pretrained(folder)
    processor.save_pretrained(folder)
    return lora_from_folder(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, processor, [model-F16.gguf, mmproj-F16.gguf]); the export runs its own checks."""
    model, processor = _trained(tmp_path_factory.mktemp("gemma3_hf"))
    paths = model.save_pretrained_gguf(tmp_path_factory.mktemp("gemma3_gguf"), processor, quantization_method="f16")
    return model, processor, paths


def test_language_model_runs_in_llama_cpp_as_gemma3(exported):
    model, processor, (text_path, mmproj) = exported
    assert (text_path.name, mmproj.name) == ("model-F16.gguf", "mmproj-F16.gguf")
    assert gguf_fields(gguf.GGUFReader(text_path))["general.architecture"] == "gemma3"
    prompts = [processor.tokenizer("What is the capital of France?")["input_ids"], [5, 9, 200, 31, 7, 64]]
    with torch.no_grad():  # the vision-language model itself, text only
        ours = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
    for mine, cpp in zip(ours, llama_cpp_logits(text_path, prompts)):
        assert (mine - cpp).abs().max() < F16_ATOL
        assert torch.equal(mine.argmax(-1), cpp.argmax(-1))


def test_mmproj_holds_what_clip_cpp_reads(exported):
    model, processor, (_, mmproj) = exported
    reader = gguf.GGUFReader(mmproj)
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == "gemma3" and fields["clip.use_gelu"] is True
    assert fields["clip.vision.projector.scale_factor"] == 2  # 8 patches a side pooled into 4 tokens a side
    assert fields["clip.vision.image_size"] == 64 and fields["clip.vision.patch_size"] == 8
    assert fields["clip.vision.projection_dim"] == 32 and fields["clip.vision.block_count"] == 2
    assert fields["clip.vision.image_mean"] == pytest.approx(list(processor.image_processor.image_mean))
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert {n: tensors[n].tensor_type for n in ("v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight",
                                                "mm.input_projection.weight", "mm.soft_emb_norm.weight",
                                                "v.blk.0.attn_q.weight", "v.blk.0.ln1.bias")} == {
        "v.patch_embd.weight": Q.F32, "v.patch_embd.bias": Q.F32, "v.position_embd.weight": Q.F32,
        "mm.input_projection.weight": Q.F16, "mm.soft_emb_norm.weight": Q.F32, "v.blk.0.attn_q.weight": Q.F16,
        "v.blk.0.ln1.bias": Q.F32}
    assert not any(n.startswith(("token_embd", "blk.", "output")) for n in tensors)  # no language-model tensor
    base = model.get_base_model().model
    projector = base.multi_modal_projector
    # stored as the checkpoint holds it, (vision width, text width): clip.cpp transposes it
    torch.testing.assert_close(gguf_tensor(tensors["mm.input_projection.weight"]),
                               projector.mm_input_projection_weight.detach().half().float(), rtol=0, atol=0)
    torch.testing.assert_close(gguf_tensor(tensors["mm.soft_emb_norm.weight"]),
                               1 + projector.mm_soft_emb_norm.weight.detach(), rtol=0, atol=0)
    q = base.vision_tower.encoder.layers[0].self_attn.q_proj
    merged = q.base_layer.weight + q.get_delta_weight("default")  # (32, 32), LoRA merged
    torch.testing.assert_close(gguf_tensor(tensors["v.blk.0.attn_q.weight"]), merged.detach().half().float(),
                               rtol=0, atol=0)


def test_released_gemma3_sizes_pool_by_clip_cpps_default():
    """896 px / 14 px patches, 256 tokens (every released Gemma 3): a kernel of 4, clip.cpp's default, so the
    converter writes no scale-factor key, and neither do we."""
    tok = _tokenizer()
    config = _config(tok, image_size=896, patch_size=14, tokens=256)
    writer = gguf.GGUFWriter(None, "clip")
    write_keys(writer, config, PROJECTORS["gemma3"], Gemma3ImageProcessorPil())
    keys = {k for shard in writer.kv_data for k in shard}
    assert "clip.vision.projector.scale_factor" not in keys and "clip.vision.image_size" in keys


@pytest.mark.parametrize("change, message", [(dict(act="gelu"), "hidden_act='gelu'"),
                                             (dict(tokens=9), "mm_tokens_per_image=9")])
def test_configurations_clip_cpp_cannot_run_are_refused_before_writing(tmp_path, change, message):
    model, processor = _trained(tmp_path / "hf", **change)
    out = tmp_path / "gguf"
    with pytest.raises(MmprojUnsupported, match=message):
        model.save_pretrained_gguf(out, processor, quantization_method="f16")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("layers, scalar, used", [(2, 16, None), (2, 8, 16), (62, 8, None), (62, 16, 8)])
def test_attention_scales_llama_cpp_ignores_are_refused(layers, scalar, used):
    """llama.cpp's gemma3 reads no attention-scale key: it scales by head_dim ** -0.5 (16 here), or by
    (hidden / heads) ** -0.5 (32 / 4 = 8) with the 27B's 62 layers; any other query_pre_attn_scalar is refused
    before a file is written (a tiny model with 256 over a head of 8 answered with a mean KL of 0.13 there)."""
    from velotune.export.gguf_arch import TensorNamer

    text = _config(_tokenizer()).get_text_config()
    text.head_dim, text.num_hidden_layers, text.query_pre_attn_scalar = 16, layers, scalar
    text.layer_types = text.layer_types[:1] * layers
    if used is None:
        TensorNamer(text)
    else:
        with pytest.raises(ValueError, match=f"query_pre_attn_scalar={scalar} but llama.cpp's gemma3 scales "
                                             f"attention by {used} "):
            TensorNamer(text)


@needs_mtmd
def test_llama_cpp_image_embeddings_equal_the_model(exported):
    model, processor, (text_path, mmproj) = exported
    assert check_image_embeddings(model, text_path, mmproj, processor.image_processor) < EMBEDDING_BUDGET


@needs_mtmd
def test_a_norm_stored_without_gemmas_one_is_caught(exported, tmp_path):
    """The soft-embedding norm written as w (the checkpoint's value) instead of 1 + w: llama.cpp's embeddings
    move far outside the budget."""
    model, processor, (text_path, mmproj) = exported
    damaged = tmp_path / mmproj.name
    data = bytearray(mmproj.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(mmproj).tensors if t.name == "mm.soft_emb_norm.weight")
    start, values = int(tensor.data_offset), tensor.data.astype("float32") - 1  # F32: stored as is
    data[start:start + values.nbytes] = values.tobytes()
    damaged.write_bytes(bytes(data))
    with pytest.raises(ImageEmbeddingMismatch, match="differ from the model's"):
        check_image_embeddings(model, text_path, damaged, processor.image_processor)


@needs_mtmd
def test_llama_cpp_answers_an_image_prompt_like_the_model(exported):
    """The two files together in llama.cpp: chat prompt with the probe image, next-token logits after it (the
    image embeddings decoded non-causally by mtmd, as transformers' token_type_ids make them attend) equal the
    model's."""
    from llama_cpp import mtmd_cpp

    model, processor, (text_path, mmproj) = exported
    image = probe_image(model, processor.image_processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[[image]], do_resize=False, add_special_tokens=False, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    marker = mtmd_cpp.mtmd_default_marker().decode()
    # the processor writes "\n\n<start_of_image>" + image tokens + "<end_of_image>\n\n"; mtmd writes the two image
    # markers around the embeddings itself (tools/mtmd/mtmd.cpp)
    cpp_prompt = prompt.replace("<start_of_image>", f"\n\n{marker}\n\n")
    tokens, cpp = llama_cpp_prompt_logits(text_path, mmproj, cpp_prompt, image)
    soft = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert tokens == [i for i in ids if i != soft]  # the same text tokens around the image
    with torch.no_grad():
        ours = model(**batch).logits[0, -1].float()  # (V,)
    assert (ours - cpp).abs().max() < F16_ATOL
    assert int(ours.argmax()) == int(cpp.argmax())
