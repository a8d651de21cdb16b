"""Issue 14, item 2 and the load-side "confusing" items: an adapter records the name the user
loaded ("org/name"), never a folder that exists only on this machine, and still loads back here;
a truncated weights file and flipped bytes that make a weight NaN are named on load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import export_shapes as tiny  # noqa: E402

from velotune import FastLanguageModel  # noqa: E402
from velotune.export import save_pretrained_merged  # noqa: E402
from velotune.resolve import travel_name  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def _hub_cache(root: Path, repo: str, tok) -> Path:
    """A Hugging Face cache holding `repo` as the hub client lays it out."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    save_pretrained_merged(tiny.model("llama"), snapshot, tok, verify=False)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_adapter_of_a_hub_model_records_the_hub_id(tok, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = _hub_cache(tmp_path / "hub", "acme/tiny-llama", tok)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tokenizer = FastLanguageModel.from_pretrained("acme/tiny-llama", load_in_4bit=False, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "acme/tiny-llama" in card and str(snapshot) not in card and "snapshots" not in card
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False, device_map="cpu")
    assert reloaded.peft_config["default"].base_model_name_or_path == "acme/tiny-llama"


@pytest.mark.slow
def test_adapter_of_the_smollm2_fixture_records_the_hub_id(tmp_path):
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model, tokenizer = FastLanguageModel.from_pretrained(name, load_in_4bit=False, max_seq_length=64,
                                                         device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == name
    assert ".cache" not in (tmp_path / "adapter" / "README.md").read_text()
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False,
                                                    max_seq_length=64, device_map="cpu")
    assert reloaded.peft_config["default"].base_model_name_or_path == name


def test_cache_paths_recorded_elsewhere_map_back_to_the_hub_id():
    assert travel_name("/home/x/.cache/huggingface/hub/models--org--name/snapshots/abc123") == "org/name"
    assert travel_name("/root/.cache/velotune/fixtures/HuggingFaceTB--SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert travel_name("outputs/my-model") == "outputs/my-model"
    assert travel_name("org/name") == "org/name"


def test_a_truncated_safetensors_file_is_named(tok, tmp_path):
    folder = save_pretrained_merged(tiny.model("llama"), tmp_path / "m", tok, verify=False)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match=rf"{weights} is truncated or damaged: its header describes {size:,} bytes, "
                                         rf"the file has {size - 1000:,}"):
        FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu")


def test_nan_weights_after_loading_name_the_tensor(tok, tmp_path):
    from safetensors import safe_open

    folder = save_pretrained_merged(tiny.model("llama"), tmp_path / "m", tok, verify=False)
    weights = folder / "model.safetensors"
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(weights), "pt") as f:
        assert name in f.keys()
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    start = 8 + header_len + header[name]["data_offsets"][0]
    data = bytearray(weights.read_bytes())
    data[start + 40:start + 48] = b"\xff" * 8  # two float32 values become NaN
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds 2 NaN/inf values"):
        FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu")


def _poke(weights: Path, name: str, value: float) -> None:
    """Write `value` into the first float32 of tensor `name` in a safetensors file (a flipped byte's effect)."""
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    assert header[name]["dtype"] == "F32"
    start = 8 + header_len + header[name]["data_offsets"][0]
    data = bytearray(weights.read_bytes())
    data[start:start + 4] = np.float32(value).tobytes()
    weights.write_bytes(bytes(data))


def test_weights_that_overflow_float16_when_loaded_name_the_tensor(tok, tmp_path):
    """Finite in the float32 file, inf once loaded in float16 (a flipped exponent bit): the tensor is named
    with the dtype's limit, not found later as a NaN loss."""
    folder = save_pretrained_merged(tiny.model("llama"), tmp_path / "m", tok, verify=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    _poke(folder / "model.safetensors", name, 3.0e5)
    FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds 1 NaN/inf values .*float16's range \(65504\)"):
        FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, device_map="cpu", dtype=torch.float16)


def test_nan_weights_of_a_generic_path_model_name_the_tensor(tmp_path):
    """Models of other families load through transformers' classes, which do not look at the values."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)).save_pretrained(
        tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    _poke(tmp_path / "model.safetensors", "transformer.h.1.mlp.c_fc.weight", float("nan"))
    with pytest.raises(ValueError, match=r"tensor '.*h\.1\.mlp\.c_fc\.weight' holds 1 NaN/inf values"):
        FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, device_map="cpu")
