"""`FamilySpec` is the single record of a family: each field that matters is checked against the
component that defines it (transformers' own modules, llama.cpp's `gguf` package), and the Phi-3
fused tensors have one implementation (split on load, fuse on save) shared with the exporters."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from tiny.families import FAMILIES as TINY, make_config, randomize_

from velotune.models import model_class_for
from velotune.models.families import MODEL_CLASSES
from velotune.models.layers import GemmaRMSNorm, RMSNorm, make_norm
from velotune.models.spec import FAMILIES, FamilySpec, family_of, fuse_state_dict, split_state_dict

# llama.cpp's architecture per family (its convert_hf_to_gguf.py: MistralForCausalLM is a LlamaModel).
LLAMA_CPP_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3,
}
# transformers' RMSNorm class per family (the plain path must be theirs bit for bit).
HF_NORM = {
    "llama": "llama.modeling_llama.LlamaRMSNorm", "mistral": "mistral.modeling_mistral.MistralRMSNorm",
    "qwen2": "qwen2.modeling_qwen2.Qwen2RMSNorm", "qwen3": "qwen3.modeling_qwen3.Qwen3RMSNorm",
    "gemma": "gemma.modeling_gemma.GemmaRMSNorm", "gemma2": "gemma2.modeling_gemma2.Gemma2RMSNorm",
    "gemma3_text": "gemma3.modeling_gemma3.Gemma3RMSNorm", "phi3": "phi3.modeling_phi3.Phi3RMSNorm",
}
TINY_OF = {"gemma3_text": "gemma3"}  # tiny_models' names where they differ from model_type


def _hf_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(f"transformers.models.{module}", fromlist=[name]), name)


def test_every_family_is_described_here():
    assert set(FAMILIES) == set(LLAMA_CPP_ARCH) == set(HF_NORM) == set(MODEL_CLASSES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_arch_is_llama_cpps_name(family):
    assert FAMILIES[family].gguf.arch == gguf.MODEL_ARCH_NAMES[LLAMA_CPP_ARCH[family]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tied_output_where_llama_cpp_has_no_output_tensor(family):
    """llama.cpp's Gemma/Gemma 2 have no `output` tensor at all (token_embd is the output): the record
    must say so; and leaving lm_head out is only right for families whose checkpoints tie it."""
    spec = FAMILIES[family]
    if gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[LLAMA_CPP_ARCH[family]]:
        assert spec.gguf.tied_output
    if spec.gguf.tied_output:
        assert MODEL_CLASSES[family].config_class().tie_word_embeddings


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_norm_offset_gives_transformers_norm_bit_for_bit(family, weight_dtype):
    """norm_offset picks the norm; in bf16 (activations bf16, weights bf16 or fp32 as after
    PEFT's k-bit preparation) ours equals transformers' exactly, output dtype included."""
    spec = FAMILIES[family]
    ours, theirs = make_norm(spec, 48, 1e-6), _hf_class(HF_NORM[family])(48, eps=1e-6)
    torch.manual_seed(0)
    w = torch.randn(48) * 0.3 + (1.0 - spec.norm_offset)
    for m in (ours, theirs):
        m.to(weight_dtype).weight.data.copy_(w)
    x = (torch.randn(3, 5, 48) * 4).to(torch.bfloat16)
    expected = theirs(x)
    assert isinstance(ours, GemmaRMSNorm if spec.norm_offset == 1.0 else RMSNorm)
    assert ours(x).dtype == expected.dtype
    assert torch.equal(ours(x), expected)


def test_unknown_norm_offset_is_named():
    with pytest.raises(ValueError, match="offset 0.5"):
        make_norm(FamilySpec("x", norm_offset=0.5), 8, 1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3", "qwen3", "phi3"])
def test_attention_scaling_is_transformers(family):
    config = make_config(family)
    ours = model_class_for(config)(config)
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert ours.model.layers[0].self_attn.scaling == theirs.model.layers[0].self_attn.scaling


def test_family_of_reads_the_config_and_knows_gemma3s_text_alias():
    assert family_of(transformers.Gemma3TextConfig()) is FAMILIES["gemma3_text"]
    assert family_of(transformers.Gemma3Config()) is FAMILIES["gemma3_text"]
    assert family_of(transformers.GPT2Config()) is None


@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])
def test_fused_groups_split_and_fuse_transformers_phi3(family):
    """transformers' Phi-3 state dict -> ours (load) -> transformers' (save), tensors identical."""
    config = make_config(family)
    theirs = transformers.Phi3ForCausalLM(config)
    randomize_(theirs)
    state = dict(theirs.state_dict())
    ours = model_class_for(config)(config)
    ours.load_state_dict(state)  # strict: every split name is one of ours
    split = dict(state)
    split_state_dict(ours.spec, config, split)
    assert set(split) == set(ours.state_dict())
    back = fuse_state_dict(ours.spec, dict(split))
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
        assert torch.equal(ours.to_hf_state_dict()[name], value), name


def test_fused_tensor_of_the_wrong_size_is_named():
    config = make_config("phi3")
    spec = FAMILIES["phi3"]
    state = {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(7, config.hidden_size)}
    with pytest.raises(ValueError, match="qkv_proj.weight has 7 rows"):
        split_state_dict(spec, config, state)
    assert "model.layers.0.self_attn.qkv_proj.weight" in state  # nothing the caller had is lost


@pytest.mark.parametrize("family", [f for f in TINY if not f.startswith("phi3")])
def test_families_without_fused_groups_keep_transformers_names(family):
    config = make_config(family)
    spec = family_of(config)
    assert spec.fused_groups == ()
    ours = model_class_for(config)(config)
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert set(ours.to_hf_state_dict()) == set(theirs.state_dict())
