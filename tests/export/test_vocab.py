"""The GGUF vocabulary: llama.cpp tokenizes text exactly as the transformers tokenizer the model
was trained with, for byte-level BPE (gpt2-style, as SmolLM2) and SentencePiece-style BPE with
byte fallback (Llama/Mistral/Gemma style)."""

from __future__ import annotations

import gguf
import pytest

from velotune.export import save_pretrained_gguf

from tiny import export_shapes as tiny

llama_cpp = pytest.importorskip("llama_cpp")

# No text starts with a space: there transformers' Metaspace adds no prefix space while llama.cpp's
# SentencePiece always does (a difference between the two tokenizer libraries, not the export).
TEXTS = ["Hello world!", "The capital of France is Paris.", "two  spaces and\nnew lines\n\n", "numbers 1234 5.67",
         "unicode: é ü ñ — 漢字 🙂", "def add(a, b):\n    return a + b"]


def _export(tokenizer, tmp_path):
    model = tiny.model("llama")
    [path] = save_pretrained_gguf(model, tmp_path, tokenizer, quantization_method="q8_0", verify=False)
    return path


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_llama_cpp_tokenizes_like_transformers(kind, tmp_path):
    tokenizer = tiny.tokenizer() if kind == "bpe" else tiny.sentencepiece_tokenizer()
    path = _export(tokenizer, tmp_path)
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == ("gpt2" if kind == "bpe" else "llama")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ours = tokenizer(text, add_special_tokens=True)["input_ids"]
            theirs = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                  special=True)
            assert theirs == ours, text
            body = [i for i in ours if i != tokenizer.bos_token_id]
            # (detokenizing a piece list without its BOS, llama.cpp keeps SentencePiece's prefix space)
            assert llm.detokenize(body).decode().removeprefix(" " if kind == "sentencepiece" else "") == \
                tokenizer.decode(body, skip_special_tokens=True), text
    finally:
        llm.close()


def test_sentencepiece_token_types(tmp_path):
    tokenizer = tiny.sentencepiece_tokenizer()
    reader = gguf.GGUFReader(_export(tokenizer, tmp_path))
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = tokenizer.get_vocab()
    assert types[vocab["<unk>"]] == 2 and types[vocab["<s>"]] == 3 and types[vocab["<0x41>"]] == 6
    assert types[vocab["\u2581Hello"]] == 1
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
