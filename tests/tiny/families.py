"""Tiny random configurations of every supported family, and their transformers references.

Every config is small enough (hidden 64, 2-4 layers, vocab 128) that a forward + backward pass
takes milliseconds on the CPU, yet exercises each architecture knob the family has: GQA, q/k/v
biases, q/k norm, sliding windows shorter than the test sequences, soft-capping, rope scaling,
partial rotary, tied embeddings, fused phi3 projections.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

torch.set_num_threads(2)

VOCAB = 128
PAD_ID = 0
# Init std of every parameter of the reference: 10x the default 0.02, so that a wrong norm, scale
# or rope shows up far above fp32 noise.
INIT_STD = 0.2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama():
    return LlamaConfig(**_COMMON, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _llama3_rope():
    return LlamaConfig(
        **_COMMON,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )


def _llama_yarn():
    return LlamaConfig(
        **_COMMON,
        num_hidden_layers=2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )


def _llama_dynamic():
    # Dynamic NTK rescales once positions pass max_position_embeddings; 8 is below the test lengths.
    cfg = dict(_COMMON, max_position_embeddings=8)
    return LlamaConfig(
        **cfg, num_hidden_layers=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )


def _mistral():
    return MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=5, head_dim=16)


def _qwen2():
    # Qwen2 only uses the window on layers >= max_window_layers when use_sliding_window is set;
    # real checkpoints leave it off, so the test does too (the biases are the point here).
    return Qwen2Config(**_COMMON, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def _qwen3():
    return Qwen3Config(**_COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)


def _gemma():
    return GemmaConfig(**_COMMON, num_hidden_layers=2, head_dim=16, hidden_act="gelu_pytorch_tanh")


def _gemma2():
    return Gemma2Config(
        **_COMMON,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
    )


def _gemma3():
    return Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    )


def _phi3():
    # Phi-3-mini-4k ships sliding_window=2047; a small one here so it matters
    return Phi3Config(**_COMMON, num_hidden_layers=2, sliding_window=6)


def _phi3_partial():
    return Phi3Config(
        **_COMMON,
        num_hidden_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


def _phi3_longrope():
    # Phi-3-*-128k: LongRoPE, short factors up to original_max_position_embeddings, long beyond
    half = 64 // 4 // 2
    return Phi3Config(
        **_COMMON,
        num_hidden_layers=2,
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
        },
    )


# name -> config factory. Names are the pytest ids.
FAMILIES = {
    "llama": _llama,
    "llama3_rope": _llama3_rope,
    "llama_yarn": _llama_yarn,
    "llama_dynamic": _llama_dynamic,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "phi3_partial": _phi3_partial,
    "phi3_longrope": _phi3_longrope,
}

# transformers' gemma2 has no sdpa path (sdpa cannot soft-cap); every other family is also
# checked against eager attention.
NO_SDPA = {"gemma2"}

# transformers' dynamic-NTK rotary embedding is stateful (it keeps the frequencies of the longest
# sequence seen until one shorter than max_position_embeddings comes); tests use a fresh reference
# for every call so that the reference is a function of its inputs only.
STATEFUL_ROPE = {"llama_dynamic"}


def make_config(family: str):
    return FAMILIES[family]()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter := its default init's mean + N(0, INIT_STD), deterministically by name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            mean = p.float().mean().item()  # 1.0 for RMSNorm ones, 0.0 for gemma's (1+w) and linears
            p.copy_(mean + INIT_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))


def make_hf(family: str, attn: str = "eager", seed: int = 0):
    """The transformers reference model, fp32, eval mode, randomised with larger-than-default weights."""
    cfg = make_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()
