"""A tokenizer built from a GGUF file takes its special tokens from the file's own metadata ids, whatever
transformers' GGUF reader made of them: transformers 5.17 (the GPU machine's) read SmolLM2's EOS as
<|im_start|> (id 1) where the file records id 2, <|im_end|>, so SFT rows ended with the wrong token."""

from __future__ import annotations

from pathlib import Path

from data.conftest import SMOLLM2_GGUF, _smollm2_dir
from velotune.tokenizer import apply_gguf_special_tokens


def test_special_tokens_come_from_the_file(tokenizer):
    path = Path(_smollm2_dir()) / SMOLLM2_GGUF
    tokenizer.eos_token = "<|im_start|>"  # what transformers 5.17 built from this file
    tokenizer.pad_token = None
    changed = apply_gguf_special_tokens(tokenizer, path)
    assert changed == ["eos_token='<|im_end|>'", "pad_token='<|im_end|>'"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    assert tokenizer.eos_token_id == 2
    assert apply_gguf_special_tokens(tokenizer, path) == []  # already as the file says
