"""A tiny random Llama written to disk the way checkpoints are, for loader tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

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
