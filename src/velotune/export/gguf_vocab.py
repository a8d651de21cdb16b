"""The tokenizer inside a GGUF file, read off the transformers tokenizer in memory (so what
llama.cpp tokenizes is what the model was trained on).

Two vocabulary kinds cover our families:
  * byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen): tokens as stored, merges, and a named
    pre-tokenizer, chosen from the tokenizer's own pre-tokenizer description;
  * SentencePiece-style BPE with byte fallback ("llama": Llama 2, Mistral, Gemma, Phi-3): tokens
    with U+2581 for spaces, `<0xNN>` byte tokens, and scores that order the merges.
Token types follow llama.cpp: 1 normal, 2 unknown, 3 control (special tokens), 4 user-defined
(added, not special), 5 unused (ids the tokenizer never produces), 6 byte.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import gguf

logger = logging.getLogger("velotune")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# Regexes of well-known byte-level pre-tokenizers -> llama.cpp's name for the same splitting.
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN2_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


@dataclass(frozen=True)
class Vocab:
    model: str               # "gpt2" or "llama"
    pre: str                 # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    add_space_prefix: bool


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers-backed) tokenizer; load it with AutoTokenizer")
    return json.loads(backend.to_str())


def _kinds(node: dict | None) -> list[dict]:
    """Flatten a tokenizers component (Sequence or single) into its parts."""
    if not node:
        return []
    for key in ("pretokenizers", "normalizers", "decoders"):
        if key in node:
            return [p for child in node[key] for p in _kinds(child)]
    return [node]


def _pre_name(spec: dict) -> str:
    parts = _kinds(spec.get("pre_tokenizer"))
    types = [p["type"] for p in parts]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p["type"] == "Split"]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if splits == [_LLAMA3_SPLIT]:
        return "llama-bpe"
    if splits == [_QWEN2_SPLIT]:
        return "qwen2"
    logger.warning("velotune: the tokenizer's pre-tokenizer %s has no known llama.cpp name; writing 'default' "
                   "(llama.cpp may split some text differently)", types)
    return "default"


def _is_sentencepiece_style(spec: dict) -> bool:
    model = spec["model"]
    decoders = [d["type"] for d in _kinds(spec.get("decoder"))]
    return bool(model.get("byte_fallback")) or "ByteFallback" in decoders or model["type"] == "Unigram" \
        or any(d.get("type") == "Replace" and "\u2581" in json.dumps(d) for d in _kinds(spec.get("decoder")))


def build_vocab(tokenizer, vocab_size: int) -> Vocab:
    """The GGUF vocabulary for a model whose embedding has `vocab_size` rows."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    if model["type"] == "Unigram":
        raise ValueError("GGUF export: Unigram (T5-style SentencePiece) tokenizers are not supported; our "
                         "families use BPE tokenizers")
    if model["type"] != "BPE":
        raise ValueError(f"GGUF export: tokenizer model {model['type']!r} is not supported (BPE only)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                         f"{vocab_size} rows; resize the embeddings (model.resize_token_embeddings) first")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    spm = _is_sentencepiece_style(spec)
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif spm and i == unk:
            tokens.append(token)
            types.append(UNKNOWN)
        elif spm and _BYTE_TOKEN.match(token):
            tokens.append(token)
            types.append(BYTE)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not spm:
        return Vocab("gpt2", _pre_name(spec), tokens, types, None, merges, False)
    # SentencePiece BPE merges the highest-scoring pair first: score each merged token by its rank.
    rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
    scores = [-float(rank.get(t, len(merges) + i)) if ty == NORMAL else 0.0 for i, (t, ty) in enumerate(zip(tokens, types))]
    prepends = any(n.get("type") == "Prepend" for n in _kinds(spec.get("normalizer"))) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
        for p in _kinds(spec.get("pre_tokenizer")))
    return Vocab("llama", "default", tokens, types, scores, None, prepends)


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, end_of_turn: str | None) -> None:
    """Vocabulary, special token ids, add_bos/add_eos and the chat template."""
    vocab = build_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(value)
    if end_of_turn is not None:
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            writer.add_eot_token_id(eot)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
