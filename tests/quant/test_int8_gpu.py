"""On the GPU (issue 18 items 4-5): `load_in_8bit=True` loads bitsandbytes int8 layers, LoRA steps lower the
loss, the merged folder and a GGUF file hold the trained model (the exporters' checks); a dynamic 4-bit folder
written on the GPU loads in velotune and in transformers with its kept layers in 16-bit. A SmolLM2-shaped
random model (the real one is a CPU fixture)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    """A random Llama of SmolLM2-135M's decoder shape with a byte-level BPE tokenizer (GGUF export needs BPE)."""
    from tiny.export_shapes import VOCAB, tokenizer
    from tiny.folders import tiny_llama_config
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("smollm2-shape") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**SMOLLM2_SHAPE, vocab_size=VOCAB)).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def test_load_in_8bit_trains_merges_and_exports(smollm2_shaped, tmp_path):
    from velotune import FastLanguageModel
    from velotune.quant.int8 import dequantize_int8_weight, is_linear8bit

    model, tokenizer = FastLanguageModel.from_pretrained(str(smollm2_shaped), load_in_4bit=False, load_in_8bit=True,
                                                         dtype=torch.bfloat16, max_seq_length=256)
    layers = [m for n, m in model.named_modules() if any(n.endswith(t) for t in TARGETS)]
    assert len(layers) == 30 * 7 and all(is_linear8bit(m) and m.weight.device.type == "cuda" for m in layers)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS, random_state=0,
                                             use_gradient_checkpointing="unsloth")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    ids = torch.randint(4, 500, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    folder = model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")  # checked
    from safetensors.torch import load_file

    merged = load_file(folder / "model.safetensors")
    layer = model.get_base_model().model.layers[3].mlp.down_proj
    expected = (dequantize_int8_weight(layer.base_layer) + layer.get_delta_weight("default").float()).bfloat16()
    torch.testing.assert_close(merged["model.layers.3.mlp.down_proj.weight"].cuda(), expected, atol=0, rtol=0)
    pytest.importorskip("gguf")
    model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="q8_0")  # the GGUF check runs


def test_dynamic_4bit_folder_written_on_gpu_loads_in_velotune_and_transformers(smollm2_shaped, tmp_path):
    from transformers import AutoModelForCausalLM

    from velotune import FastLanguageModel
    from velotune.quant import is_linear4bit
    from velotune.quantize import quantize_dynamic

    report = quantize_dynamic(str(smollm2_shaped), tmp_path / "dyn", max_tokens=2048, seq_len=256)
    assert report.kept and report.bytes_dynamic <= 1.10 * report.bytes_all_4bit
    assert set(report.perplexity) == {"16-bit", "nf4", "dynamic"}
    config = json.loads((tmp_path / "dyn" / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", *report.kept]
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "dyn"), load_in_4bit=True, dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "dyn", device_map="cuda", dtype=torch.bfloat16).eval()
    for loaded in (ours, theirs):
        for c in report.candidates:
            assert is_linear4bit(loaded.get_submodule(c.name)) == (c.name not in report.kept), c.name
    ids = torch.randint(4, 500, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 2e-2  # same weights; bf16 kernels differ
