"""Tiny random vision-language models of each family, written to disk as checkpoints are: config and
weights from transformers' own classes, a real character-level tokenizer with the family's special
tokens and chat template, and the family's image processor with small sizes (PIL backend: CI has no
torchvision). Vision towers have one or two layers and a handful of patches, so a step takes
milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "gemma3")
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
           "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
           "{% for part in message['content'] %}"
           "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
           "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LLAMA3 = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
           "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
           "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
           "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
            "{% endfor %}{% endif %}[/INST]{% else %}{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ eos_token }}"
            "{% endif %}{% endfor %}")
_GEMMA = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
          "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
          "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
          "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}"
          "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

SPECIALS = {
    "qwen2_vl": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"], dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "mllama": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|image|>",
                "<|python_tag|>", "<|finetune_right_pad_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")),
    "llava": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<pad>"],
              dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>"], dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")),
}
SPECIALS["qwen2_5_vl"] = SPECIALS["qwen2_vl"]
TEMPLATES = {"qwen2_vl": _CHATML, "qwen2_5_vl": _CHATML, "mllama": _LLAMA3, "llava": _MISTRAL, "gemma3": _GEMMA}


def tokenizer(family: str) -> PreTrainedTokenizerFast:
    specials, named = SPECIALS[family]
    vocab = {t: i for i, t in enumerate(specials + _CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    extra = {}
    if family == "gemma3":
        extra["extra_special_tokens"] = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                         "eoi_token": "<end_of_image>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=specials[0], **named, **extra)
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in named.values()]})
    tok.chat_template = TEMPLATES[family]
    return tok


def _text(vocab_size: int, **extra) -> dict:
    # initializer_range 0.2, not 0.02: with a frozen lm_head of std 0.02 on 32 features the logits stay near 0
    # whatever LoRA does, and a few training steps could not lower the loss
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                **extra)


def build(family: str, seed: int = 0):
    """(transformers model, processor) of the family, random weights seeded by `seed`."""
    import transformers as T

    tok = tokenizer(family)
    ids = tok.convert_tokens_to_ids
    V = len(tok)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
        vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=8, temporal_patch_size=2, spatial_merge_size=2,
                      in_channels=3)
        if family == "qwen2_vl":
            vision.update(embed_dim=32, mlp_ratio=2)
            config_cls, proc_cls = T.Qwen2VLConfig, T.Qwen2VLProcessor
        else:
            vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
            config_cls, proc_cls = T.Qwen2_5_VLConfig, T.Qwen2_5_VLProcessor
        config = config_cls(text_config=_text(V, rope_parameters=rope), vision_config=vision,
                            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
                                                   patch_size=8, temporal_patch_size=2, merge_size=2)
        processor = _qwen_processor(proc_cls, image_processor, tok)
    elif family == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        config = T.MllamaConfig(
            text_config=_text(V, cross_attention_layers=[1], pad_token_id=ids("<|finetune_right_pad_id|>"),
                              bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>")),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                               attention_heads=2, image_size=16, patch_size=8, max_num_tiles=4, vision_output_dim=64,
                               intermediate_layers_indices=[0]),
            image_token_index=ids("<|image|>"))
        image_processor = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4)
        processor = T.MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)
    elif family == "llava":
        # Llava with a CLIP tower: Pixtral's processor needs torchvision, which CI lacks; Pixtral's model
        # has the same layout (vision_tower, multi_modal_projector, language_model), tested apart.
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = T.LlavaConfig(
            text_config=dict(model_type="mistral", **_text(V, pad_token_id=ids("<pad>"))),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
                               projection_dim=32),
            image_token_id=ids("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default")
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                     vision_feature_select_strategy="default", image_token="<image>",
                                     num_additional_image_tokens=1, chat_template=tok.chat_template)
    elif family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        config = T.Gemma3Config(
            text_config=_text(V, head_dim=8, pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"),
                              eos_token_id=ids("<eos>"), sliding_window=64),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, vision_use_head=False),
            mm_tokens_per_image=4, image_token_index=ids("<image_soft_token>"),
            boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"))
        image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        processor = T.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                      chat_template=tok.chat_template)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = T.AutoModelForImageTextToText.from_config(config).eval()
    return model, processor


def write(folder: Path, family: str, seed: int = 0):
    """Save the family's tiny model and processor into `folder`; return (model, processor)."""
    model, processor = build(family, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def _qwen_processor(proc_cls, image_processor, tok):
    """Qwen2-VL's processor as a real checkpoint has it: with a video processor where torchvision can build one
    (the GPU machine: a folder without one does not load in transformers 5.17's AutoProcessor, nor in Unsloth),
    image processor and tokenizer only where it cannot (CI: velotune.vision.processors)."""
    from transformers.utils import is_torchvision_available

    from velotune.vision.processors import image_only_processor

    if not is_torchvision_available():
        return image_only_processor(proc_cls)(image_processor=image_processor, tokenizer=tok,
                                              chat_template=tok.chat_template)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(size=dict(image_processor.size), patch_size=image_processor.patch_size,
                                  temporal_patch_size=image_processor.temporal_patch_size,
                                  merge_size=image_processor.merge_size)
    return proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video,
                    chat_template=tok.chat_template)


def lora_from_folder(folder):
    """(model, processor): a saved vision folder loaded by velotune in fp32 with LoRA (r=4) on both towers'
    attention and MLP, every B random (so a merged export differs from the base weights), in eval mode."""
    from velotune import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(folder), load_in_4bit=False, dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)  # both towers, attention and MLP
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), processor


def gguf_fields(reader) -> dict:
    """A GGUFReader's key-value fields (the header's own GGUF.* entries left out)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensor(tensor) -> torch.Tensor:
    """A GGUFReader tensor as fp32 in PyTorch's axis order (GGUF lists the dimensions innermost first)."""
    return torch.from_numpy(tensor.data.astype("float32")).reshape(tuple(reversed([int(n) for n in tensor.shape])))
