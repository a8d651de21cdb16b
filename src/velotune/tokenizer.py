"""Make a tokenizer safe for training: a padding token that is not EOS, padding on the right.

Padding with EOS is a classic silent failure: collators set the labels of padding tokens to
-100, so when pad == EOS the model never sees an EOS label and never learns to stop. We pick
an existing token that chat data never contains, and only add a new one when none exists
(which grows the embedding matrix by one row; the caller resizes the model).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("velotune")

# Tokens reserved for padding, or otherwise unused in fine-tuning data, by the families we know.
PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<|pad|>",
    "<pad>",  # Gemma, Mistral v3
    "[PAD]",
    "<|PAD_TOKEN|>",
    "<|fim_pad|>",  # Qwen 2.5
    "<|dummy_0|>",  # Phi-4
)
NEW_PAD_TOKEN = "<|PAD_TOKEN|>"


def choose_pad_token(tokenizer) -> tuple[str, bool]:
    """(token, must_add): the pad token to use and whether it is new to the vocabulary."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != eos:
            return candidate, False
    # The unknown token never appears in byte-level BPE data, so it pads safely (SmolLM2, GPT-2 style).
    unk = tokenizer.unk_token
    if unk is not None and unk != eos and unk in vocab:
        return unk, False
    return NEW_PAD_TOKEN, True


def fix_tokenizer(tokenizer) -> bool:
    """Set a non-EOS pad token and right padding; returns True when a token was added."""
    added = False
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        previous = tokenizer.pad_token
        token, added = choose_pad_token(tokenizer)
        if added:
            tokenizer.add_special_tokens({"pad_token": token})
        else:
            tokenizer.pad_token = token
        why = "had none" if previous is None else f"padded with the EOS token {previous!r}, which would mask every EOS label"
        logger.warning("velotune: the tokenizer %s; padding with %r (id %d) instead%s", why, token,
                       tokenizer.pad_token_id, ", a new token" if added else "")
    tokenizer.padding_side = "right"
    return added


# GGUF metadata key -> the tokenizer attribute it names.
GGUF_SPECIAL_TOKENS = {"tokenizer.ggml.bos_token_id": "bos_token", "tokenizer.ggml.eos_token_id": "eos_token",
                       "tokenizer.ggml.unknown_token_id": "unk_token", "tokenizer.ggml.padding_token_id": "pad_token"}


def apply_gguf_special_tokens(tokenizer, path) -> list[str]:
    """Set BOS/EOS/UNK/PAD to the tokens whose ids the GGUF file itself records; returns what changed.

    transformers builds a tokenizer from a GGUF file, and how it reads the special tokens differs by version:
    5.17 (the GPU machine's) gave SmolLM2's file EOS <|im_start|> (id 1) where the file says id 2,
    <|im_end|>, so training data ended with the wrong token and the model never learned to stop.
    The file is the truth whatever the version."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    changed = []
    for key, attr in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is None:
            continue
        token_id = int(field.contents())
        if not 0 <= token_id < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, attr) != token:
            setattr(tokenizer, attr, token)
            changed.append(f"{attr}={token!r}")
    if changed:
        logger.info("velotune: special tokens from %s's metadata: %s", Path(path).name, ", ".join(changed))
    return changed
