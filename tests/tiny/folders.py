"""A tiny random Llama written to disk the way checkpoints are, and velotune's LoRA model loaded from it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from velotune import FastLanguageModel

VOCAB = 96


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """A real (word-level) fast tokenizer: ids 0-3 special, then single characters."""
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    chars = [chr(c) for c in range(32, 32 + VOCAB - len(specials) - 1)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>" if with_pad else None)
    return tok


def write_tiny_llama(folder: Path, seed: int = 0, shard_size: str | None = None, safe: bool = True,
                     with_pad: bool = True, **config_overrides) -> LlamaForCausalLM:
    """Save a seeded random transformers Llama (and its tokenizer) to `folder`; return the model."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    if not safe:  # an older checkpoint: one PyTorch pickle instead of safetensors
        for file in Path(folder).glob("model*.safetensors*"):
            file.unlink()
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    tiny_tokenizer(with_pad=with_pad).save_pretrained(folder)
    return model


def tiny_folder(root: Path, seed: int = 0) -> Path:
    folder = root / "tiny-llama"
    if not (folder / "config.json").is_file():
        write_tiny_llama(folder, seed=seed)
    return folder


def tiny_lora(folder: Path, random_state: int = 3407, checkpointing=False, **kwargs):
    """(peft model, tokenizer): the tiny Llama in fp32 on the CPU with LoRA r=8 on every projection."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=random_state,
                                             use_gradient_checkpointing=checkpointing, **kwargs)
    return model, tokenizer
