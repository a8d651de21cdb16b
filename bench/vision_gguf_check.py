"""Vision GGUF at real vision-tower sizes: how far llama.cpp's image embeddings from our mmproj file are from the
model's, and how long the export and llama.cpp's encoding take (issue 20 item 5; a measurement, not a test).

Qwen2-VL-2B's or Qwen2.5-VL-3B's vision tower and merger, or Gemma 3 4B's SigLIP tower and projector (896 px,
4096 patches pooled into 256 tokens) (config.json sizes, random weights), a one-layer text model of the right
width (the mmproj's projection_dim) with a small BPE vocabulary. Needs llama-cpp-python with
its multimodal library (mtmd); a scratch build of llama-cpp-python's CMake project can be pointed at with
LLAMA_CPP_LIB_PATH=<build>/bin MTMD_CPP_LIB=<build>/vendor/llama.cpp/tools/mtmd. CPU is enough (~1 min a run).

    PYTHONPATH=src:tests python bench/vision_gguf_check.py --family qwen2_5_vl --dtype bfloat16
    PYTHONPATH=src:tests python bench/vision_gguf_check.py --family gemma3 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

TEXT = {
    "qwen2_vl": dict(hidden_size=1536, num_attention_heads=12),
    "qwen2_5_vl": dict(hidden_size=2048, num_attention_heads=16),
    "gemma3": dict(hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   query_pre_attn_scalar=256),
}
VISION = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14),
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                       patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    "gemma3": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=896, patch_size=14, vision_use_head=False),
}


def build_gemma3(folder: Path) -> None:
    """Gemma 3 4B's vision side; the input projection drawn at random (transformers starts it at zero, which
    would make every image embedding zero)."""
    import json

    import transformers as T
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tiny import export_shapes, vision as tiny_vision  # tests/tiny

    spec = json.loads(export_shapes.sentencepiece_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"]["prepend_scheme"] = "never"  # Gemma's: no space before the text
    image_tokens = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                  extra_special_tokens=image_tokens)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", *image_tokens.values()]})
    tok.chat_template = tiny_vision.TEMPLATES["gemma3"]
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), intermediate_size=256, num_hidden_layers=1, **TEXT["gemma3"])
    config = T.Gemma3Config(text_config=text, vision_config=VISION["gemma3"], mm_tokens_per_image=256,
                            image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                            eoi_token_index=ids("<end_of_image>"))
    processor = T.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}),
                                  tokenizer=tok, image_seq_length=256, chat_template=tok.chat_template)
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0, 0.1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build(family: str, folder: Path) -> None:
    import transformers as T

    if family == "gemma3":
        return build_gemma3(folder)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tiny import export_shapes, vision as tiny_vision  # tests/tiny
    from velotune.vision.processors import image_only_processor

    tok = export_shapes.tokenizer()  # byte-level BPE (the GGUF vocabulary needs BPE) + Qwen's vision tokens
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    tok.chat_template = tiny_vision.TEMPLATES["qwen2_vl"]
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), intermediate_size=256, num_hidden_layers=1, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                **TEXT[family])
    vision = dict(temporal_patch_size=2, spatial_merge_size=2, **VISION[family])
    config_cls, processor_cls = ((T.Qwen2VLConfig, T.Qwen2VLProcessor) if family == "qwen2_vl"
                                 else (T.Qwen2_5_VLConfig, T.Qwen2_5_VLProcessor))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    processor = image_only_processor(processor_cls)(
        image_processor=Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2), tokenizer=tok,
        chat_template=tok.chat_template)
    torch.manual_seed(0)
    T.AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(VISION), default="qwen2_5_vl")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()

    from velotune import FastVisionModel
    from velotune.export.mtmd_check import llama_cpp_image_embeddings, model_image_embeddings, probe_image
    from velotune.vision.export import save_pretrained_gguf

    folder = Path(tempfile.mkdtemp())
    build(args.family, folder)
    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False,
                                                       dtype=getattr(torch, args.dtype))
    start = time.perf_counter()
    text_path, mmproj = save_pretrained_gguf(model, tempfile.mkdtemp(), processor, quantization_method="f16",
                                             verify=False)
    written = time.perf_counter() - start
    image = probe_image(model, processor.image_processor)
    ours = model_image_embeddings(model, processor.image_processor, image)  # float32 (see mtmd_check)
    start = time.perf_counter()
    theirs = llama_cpp_image_embeddings(text_path, mmproj, image)
    encoded = time.perf_counter() - start
    error = float((theirs - ours).norm() / ours.norm())
    print("| family | dtype | mmproj | image tokens | export (s) | llama.cpp load+encode (s) | relative error |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.family} | {args.dtype} | {mmproj.stat().st_size / 2**30:.2f} GiB | {ours.shape[0]} | "
          f"{written:.1f} | {encoded:.1f} | {error:.1e} |")


if __name__ == "__main__":
    main()
