"""bnb-format (de)serialization: our keys equal bitsandbytes', and transformers' saves load."""

import json

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from velotune.quant import (  # noqa: E402
    dequantize_nf4_state,
    linear4bit_state_dict,
    load_prequantized,
    quantize_nf4,
    to_linear4bit,
)
from tiny.bnb_reference import bnb_dequantize_4bit  # noqa: E402

KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4"]  # fmt: skip


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_keys_and_round_trip(dtype, compress_statistics):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33).to(dtype)
    layer = to_linear4bit(linear, dtype, compress_statistics=compress_statistics)
    sd = linear4bit_state_dict(layer, "model.layers.0.mlp.up_proj")
    keys = KEYS if compress_statistics else KEYS[:3] + KEYS[5:]
    assert sorted(sd) == sorted(f"model.layers.0.mlp.up_proj.{k}" for k in keys)
    # identical to what bitsandbytes' own Linear4bit.state_dict writes (minus the ordinary bias)
    theirs = layer.state_dict(prefix="model.layers.0.mlp.up_proj.")
    assert set(theirs) - set(sd) == {"model.layers.0.mlp.up_proj.bias"}
    for key, value in sd.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    meta = json.loads(bytes(sd["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [33, 70]
    assert meta["dtype"] == str(dtype).removeprefix("torch.")

    loaded = load_prequantized(sd, "model.layers.0.mlp.up_proj.", bias=linear.bias.detach(), compute_dtype=dtype)
    assert isinstance(loaded, bnb.nn.Linear4bit) and loaded.weight.bnb_quantized
    assert torch.equal(loaded.weight.data, layer.weight.data)
    assert torch.equal(
        dequantize_nf4_state(loaded.weight.data, loaded.weight.quant_state),
        dequantize_nf4_state(layer.weight.data, layer.weight.quant_state),
    )
    x = torch.randn(3, 70, dtype=dtype)
    loaded.train(), layer.train()
    assert torch.equal(loaded(x), layer(x))
    assert sorted(linear4bit_state_dict(loaded, "p")) == sorted(f"p.{k}" for k in keys)


def test_safetensors_file_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = to_linear4bit(nn.Linear(64, 16, bias=False))
    save_file(linear4bit_state_dict(layer, "fc"), tmp_path / "m.safetensors")
    loaded = load_prequantized(load_file(tmp_path / "m.safetensors"), "fc")
    assert loaded.bias is None
    assert torch.equal(
        dequantize_nf4_state(loaded.weight.data, loaded.weight.quant_state),
        dequantize_nf4_state(layer.weight.data, layer.weight.quant_state),
    )


@pytest.fixture(scope="module")
def transformers_bnb_checkpoint(tmp_path_factory):
    """A tiny Llama saved by transformers+bitsandbytes in 4-bit (NF4, double quant), and its fp source."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("bnb4")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "fp")
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(
            root / "fp", quantization_config=qcfg, device_map="cpu", dtype=torch.float32
        )
        model.save_pretrained(root / "q4")
    except Exception as exc:  # older transformers/bitsandbytes pairs refuse 4-bit on CPU
        pytest.skip(f"transformers+bitsandbytes cannot save 4-bit on this CPU: {exc}")
    return root, model


def test_loads_transformers_bnb_4bit_checkpoint(transformers_bnb_checkpoint):
    from safetensors.torch import load_file

    root, model = transformers_bnb_checkpoint
    saved = load_file(root / "q4" / "model.safetensors")
    source = load_file(root / "fp" / "model.safetensors")
    prefixes = sorted({k[: -len(".weight.absmax")] for k in saved if k.endswith(".weight.absmax")})
    assert len(prefixes) == 2 * 7  # every projection; lm_head stays 16-bit
    for prefix in prefixes:
        assert sorted(k for k in saved if k.startswith(prefix + ".weight")) == sorted(f"{prefix}.{k}" for k in KEYS)
        ours = load_prequantized(saved, prefix, compute_dtype=torch.float32)
        theirs = model.get_submodule(prefix)
        their_w = bnb_dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
        assert torch.equal(dequantize_nf4_state(ours.weight.data, ours.weight.quant_state), their_w)
        # and quantizing the same fp weight ourselves gives their file bit for bit
        packed, state = quantize_nf4(source[prefix + ".weight"])
        assert torch.equal(packed, saved[prefix + ".weight"])
        assert torch.equal(state.absmax, saved[prefix + ".weight.absmax"])
        assert torch.equal(state.state2.absmax, saved[prefix + ".weight.nested_absmax"])
        x = torch.randn(2, ours.in_features)
        ours.train()
        # what their layer computes on a CPU without bitsandbytes' AVX512 kernels (tiny/bnb_reference.py says why)
        assert torch.equal(ours(x), torch.nn.functional.linear(x, their_w))
