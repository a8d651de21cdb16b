"""save_pretrained_merged: merged folders load in transformers' own classes with the same logits,
stream shard by shard, refuse what they should, and never clobber a user's folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from velotune.export import SAVE_METHODS, HubUploadError, save_pretrained_merged
from velotune.export.folders import MARKER
from velotune.export.verify import same_on_every_cpu
from velotune.quant import is_linear4bit

from tiny import export_shapes as tiny
from .conftest import IDS, logits, lora


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_merged_16bit_loads_in_transformers_with_equal_logits(family, tok, tmp_path, caplog):
    caplog.set_level("INFO", logger="velotune")
    model = lora(tiny.model(family), target_modules="all-linear")
    expected = logits(model)
    folder = model.save_pretrained_merged(tmp_path / "out", tok, save_method="merged_16bit")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", MARKER, "tokenizer.json"} <= names
    assert not any(n.endswith(".partial") for n in names)
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert type(loaded).__module__.startswith("transformers.")  # transformers' own class, not ours
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(folder)("Hello")["input_ids"] == tok("Hello")["input_ids"]
    assert "export check (transformers)" in caplog.text and "export check (velotune)" in caplog.text
    # the check also generates: greedy on the engine (trained model) == each loader's greedy (issue 16)
    assert caplog.text.count("equal the trained model's on the generation engine for 3 of 3 prompts") == 2


def test_lora_on_embeddings_and_trained_lm_head_untie(tok, tmp_path):
    base = tiny.model("qwen2")  # tied embeddings
    model = lora(base, target_modules=["q_proj", "v_proj", "lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model)
    folder = save_pretrained_merged(model, tmp_path / "out", tok)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=1e-5)


def test_merging_a_4bit_model_dequantizes_nf4(tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    from velotune.quant import quantize_model_

    base = tiny.model("llama")
    quantize_model_(base, skip_modules=("lm_head",), compute_dtype=torch.float32)
    model = lora(base)
    expected = logits(model)
    folder = model.save_pretrained_merged(tmp_path / "out", tok, save_method="merged_16bit")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)


def test_merged_4bit_is_refused_and_forced_writes_a_bnb_folder(tok, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    model = lora(tiny.model("llama"))
    with pytest.raises(ValueError, match="merged_4bit_forced"):
        model.save_pretrained_merged(tmp_path / "refused", tok, save_method="merged_4bit")
    assert not (tmp_path / "refused").exists()
    expected = logits(model)
    with monkeypatch.context() as patch:
        # The export check loads the folder with transformers as on a CPU with AVX512-BF16, whose bitsandbytes path
        # repacks the bytes (and fails on layers narrower than a block): the check must judge the same on every CPU.
        patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
        folder = model.save_pretrained_merged(tmp_path / "nf4", tok, save_method="merged_4bit_forced")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["quant_method"] == "bitsandbytes"
    # bitsandbytes' own CPU path where the processor has AVX512-BF16 rounds the scales to bf16: off, as in the check
    loaded = same_on_every_cpu(AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval())
    assert any(is_linear4bit(m) for m in loaded.modules())
    # the same weights: merge in 16-bit, then our NF4 on every decoder Linear -> identical logits
    from velotune.quant import quantize_model_

    reference = save_pretrained_merged(model, tmp_path / "fp", tok, verify=False)
    reference = AutoModelForCausalLM.from_pretrained(reference, device_map="cpu").eval()
    quantize_model_(reference, skip_modules=("lm_head",), compute_dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-4, rtol=1e-4)
    assert (logits(loaded) - expected).abs().max() > 1e-3  # and it did quantize


def test_sharded_streaming_export(tok, tmp_path):
    model = lora(tiny.model("llama"))
    folder = save_pretrained_merged(model, tmp_path / "out", tok, max_shard_size="600KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((folder / s).is_file() for s in shards)
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)


def test_safetensors_even_when_safe_serialization_false(tok, tmp_path, caplog):
    """The docs say saves are safetensors; .bin pickles run code when loaded (issue 13 item 5)."""
    model = lora(tiny.model("llama"))
    with caplog.at_level("WARNING", logger="velotune"):
        folder = save_pretrained_merged(model, tmp_path / "out", tok, safe_serialization=False, verify=False)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert "safe_serialization=False" in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)


def test_peak_memory_is_about_one_shard(tmp_path):
    """Peak RSS growth while exporting a ~90 MB model in 8 MB shards stays far below the model's size
    (a non-streaming merge would at least double it). Run in a fresh process for a clean peak."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(tiny.__file__.rsplit('/', 1)[0])!r})
        from transformers import LlamaConfig
        from velotune.models import model_class_for
        from velotune.export import save_pretrained_merged
        torch.set_num_threads(2)
        config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8)
        model = model_class_for(config)(config).eval()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        save_pretrained_merged(model, {str(tmp_path / 'big')!r}, None, max_shard_size="8MB", verify=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(size, after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    size, growth = map(int, out.split()[-2:])
    assert size > 80e6
    assert growth < 0.3 * size, f"peak RSS grew by {growth / 1e6:.0f} MB exporting a {size / 1e6:.0f} MB model"


def test_refuses_foreign_nonempty_folder_and_names_the_fix(tok, tmp_path):
    model = lora(tiny.model("llama"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained_merged(model, tmp_path / "mine", tok)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    save_pretrained_merged(model, tmp_path / "mine", tok, overwrite=True, verify=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    # a folder holding a previous velotune export is reused without being told
    save_pretrained_merged(model, tmp_path / "mine", tok, verify=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(save_method="merged_8bit"), "merged_16bit"),
    (dict(maximum_memory_usage=1.5), "maximum_memory_usage"),
    (dict(max_shard_size="lots"), "max_shard_size"),
])
def test_bad_arguments_are_named(kwargs, match, tok, tmp_path):
    with pytest.raises(ValueError, match=match):
        save_pretrained_merged(lora(tiny.model("llama")), tmp_path / "out", tok, **kwargs)
    assert set(SAVE_METHODS) == {"merged_16bit", "merged_4bit", "merged_4bit_forced", "lora"}


def test_lora_method_writes_a_peft_folder(tok, tmp_path):
    model = lora(tiny.model("llama"))
    folder = model.save_pretrained_merged(tmp_path / "adapter", tok, save_method="lora")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny.model("llama"), folder).eval()
    torch.testing.assert_close(logits(reloaded), logits(model))
    with pytest.raises(ValueError, match="merged_16bit"):
        save_pretrained_merged(tiny.model("llama"), tmp_path / "plain", tok, save_method="lora")


def test_full_finetuned_plain_model_exports(tok, tmp_path):
    model = tiny.model("gemma2")
    folder = save_pretrained_merged(model, tmp_path / "out", tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)


def test_push_to_hub_offline_fails_clearly_after_a_complete_folder(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = lora(tiny.model("llama"))
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE") as info:
        model.push_to_hub_merged("someone/tiny", tok, save_method="merged_16bit",
                                 save_directory=tmp_path / "local", verify=False)
    assert str((tmp_path / "local").resolve()) in str(info.value)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "local", device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)


def test_generic_path_transformers_model_with_plain_peft_exports(tok, tmp_path):
    """A model on the generic path (transformers' own class, adapters from PEFT directly) exports too."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from velotune.export import save_pretrained_gguf

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny.CONFIGS["llama"]()).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    expected = logits(model.eval())
    folder = save_pretrained_merged(model, tmp_path / "merged", tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=1e-5)
    save_pretrained_gguf(model, tmp_path / "gguf", tok, quantization_method="q8_0")  # its check must pass
