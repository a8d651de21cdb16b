"""Tiny random models of every family, shaped so the k-quants apply (row lengths multiples of
256), and a real byte-level BPE tokenizer trained here on a few sentences (vocab 512)."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from velotune.models import model_class_for

VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.", "def add(a, b):\n    return a + b\n",
    "Once upon a time, there was a small model that learned to count: 1, 2, 3, 4, 5.",
    "user assistant system You are a helpful assistant.", "Numbers 1234 and 56789 and 3.14159.",
]

_COMMON = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, rms_norm_eps=1e-5)


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    from velotune.chat_templates import get_chat_template

    return get_chat_template(fast, "chatml")


CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_hidden_layers=2),
    "llama3_rope": lambda: LlamaConfig(**_COMMON, num_hidden_layers=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_hidden_layers=2, head_dim=64),
    "gemma": lambda: GemmaConfig(**_COMMON, num_hidden_layers=2, head_dim=64, hidden_act="gelu_pytorch_tanh"),
    "gemma2": lambda: Gemma2Config(**_COMMON, num_hidden_layers=2, head_dim=64, sliding_window=8,
                                   query_pre_attn_scalar=64, attn_logit_softcapping=50.0,
                                   final_logit_softcapping=30.0),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, num_hidden_layers=3, head_dim=64, sliding_window=8,
                                            query_pre_attn_scalar=64,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**_COMMON, num_hidden_layers=2, sliding_window=None),
}


def model(family: str, seed: int = 0, std: float = 0.05):
    """A tiny random model of our own class for `family` (a CONFIGS key), fp32, eval mode."""
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    m = model_class_for(config)(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:  # norms: near their identity value, with some variety
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, std)
    return m.eval()


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Gemma-style tokenizer: BPE over U+2581-marked words with byte fallback (<0xNN>
    tokens in the vocabulary), a space prefixed to the first word, <unk>/<s>/</s> specials."""
    from tokenizers import Regex  # noqa: F401  (keeps the tokenizers import set in one place)

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(_TEXT * 20, trainer)
    # byte tokens belong to the model's vocabulary (as in Llama's tokenizer.json), not to the added tokens
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    tok = Tokenizer.from_str(json.dumps(spec))
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
