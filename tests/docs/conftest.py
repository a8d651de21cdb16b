"""Fixtures of the docs suite: the names earlier notebook cells define, offline and small.

SmolLM2 stands in for every model the docs name. Snippets that only use the `model` an earlier cell
built (saving, exporting, continued training) get a tiny random Llama with a small real BPE tokenizer
and ChatML: the snippet's text is the same and CI time stays small (exporting SmolLM2 to three GGUF
files takes minutes on two cores).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .local import small_tokenizer, tiny_model


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Snippets write "outputs", "dir", "model", "lora_model" in the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    """One thread for these small ops (tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a small BPE tokenizer and ChatML, saved like a checkpoint (rows of
    256 so every GGUF quantization applies)."""
    folder = tmp_path_factory.mktemp("docs") / "tiny-llama"
    tokenizer = small_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lora(tiny_dir):
    """A LoRA model on the tiny Llama, B made non-zero so the adapter changes outputs (shared by the
    saving tests: exports do not modify the model)."""
    model, tokenizer = tiny_model(tiny_dir, r=16, lora_alpha=16, use_gradient_checkpointing=False, random_state=3407)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tokenizer
