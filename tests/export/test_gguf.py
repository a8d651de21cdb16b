"""save_pretrained_gguf without llama.cpp: files for every family read back (our GGUFReader path)
to the same model, metadata and tokenizer inside, one pass for several methods, Modelfiles, and
every bad-input case. The llama.cpp round trips are in test_llama_cpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from velotune.export import ExportMismatchError, check_gguf, save_pretrained_gguf, save_pretrained_ollama
from velotune.export.gguf_reader import model_from_gguf

from tiny import export_shapes as tiny
from .conftest import IDS, logits, lora


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_every_family_writes_a_file_that_reads_back_to_the_model(family, tok, tmp_path, caplog):
    caplog.set_level("INFO", logger="velotune")
    model = lora(tiny.model(family), target_modules="all-linear")
    [path] = model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method="f16")
    assert "export check model-F16.gguf: " in caplog.text
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    assert arch == {"mistral": "llama", "llama3_rope": "llama", "gemma3_text": "gemma3"}.get(family, family)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == tiny.VOCAB
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert _field(reader, f"{arch}.block_count") == model.config.num_hidden_layers
    # fp16 weights: logits within fp16 rounding of the trained (adapter) model's
    torch.testing.assert_close(logits(model_from_gguf(path, model.get_base_model())), logits(model),
                               atol=1e-2, rtol=0)  # fp16 weights: ~5e-4 relative each


def test_one_pass_writes_every_requested_file(tok, tmp_path):
    model = tiny.model("qwen3")
    paths = save_pretrained_gguf(model, tmp_path / "out", tok, quantization_method=["f16", "q8_0", "q4_0", "f16"],
                                 verify=False)
    assert [p.name for p in paths] == ["model-F16.gguf", "model-Q8_0.gguf", "model-Q4_0.gguf"]
    sizes = [p.stat().st_size for p in paths]
    assert sizes[0] > sizes[1] > sizes[2]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(paths[1]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    folder = tmp_path / "out"
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-F16.gguf")
    assert (folder / "Modelfile.q8_0").read_text().startswith("FROM ./model-Q8_0.gguf")
    assert not list(folder.glob("*.partial"))


def test_quantized_file_check_reports_the_quantization_cost(tok, tmp_path):
    model = tiny.model("llama")
    [path] = save_pretrained_gguf(model, tmp_path / "out", tok, quantization_method="q4_0", verify=False)
    result = check_gguf(model, path, tok, "q4_0", runner="velotune")
    assert 0 < result.quantization.mean_kl < 0.25  # reported: what q4_0 costs this model
    with pytest.raises(ExportMismatchError, match="general.file_type"):
        check_gguf(model, path, tok, "f32", runner="velotune")  # a 4-bit file is not an f32 one


def test_a_different_model_fails_the_check_loudly(tok, tmp_path):
    trained = tiny.model("llama", seed=0, std=0.2)
    [path] = save_pretrained_gguf(trained, tmp_path / "out", tok, quantization_method="q8_0", verify=False)
    other = tiny.model("llama", seed=1, std=0.2)
    with pytest.raises(ExportMismatchError):
        check_gguf(other, path, tok, "q8_0", runner="velotune")


def test_unknown_method_lists_every_method(tok, tmp_path):
    with pytest.raises(ValueError) as info:
        save_pretrained_gguf(tiny.model("llama"), tmp_path / "out", tok, quantization_method="q7_k")
    message = str(info.value)
    for method in ("q4_k_m", "q8_0", "f16", "q2_k", "q3_k_l", "q5_k_s", "q6_k", "fast_quantized"):
        assert method in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="i-quant"):
        save_pretrained_gguf(tiny.model("llama"), tmp_path / "out", tok, quantization_method="iq2_xxs")


def test_family_gguf_cannot_describe_fails_before_writing(tok, tmp_path):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tiny.VOCAB, n_embd=64, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GGUF export supports the families"):
        save_pretrained_gguf(model, tmp_path / "out", tok)
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_space_is_refused_with_the_size(tok, tmp_path, monkeypatch):
    import shutil

    from velotune.export import folders

    real = shutil.disk_usage
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match="not enough disk space.*needs about"):
        save_pretrained_gguf(tiny.model("llama"), tmp_path / "out", tok, quantization_method="f16")
    assert not list((tmp_path / "out").glob("*.gguf*"))


def test_a_failed_write_leaves_no_file(tok, tmp_path):
    model = tiny.model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")  # diverged training
    with pytest.raises(ValueError, match="NaN"):
        save_pretrained_gguf(model, tmp_path / "out", tok, quantization_method=["q8_0", "q4_0"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_no_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        save_pretrained_gguf(tiny.model("llama"), tmp_path / "out", None)


def test_save_pretrained_ollama_writes_template_stops_and_system(tok, tmp_path):
    from velotune.chat_templates import get_chat_template

    tok = get_chat_template(tok, "chatml", system_message="You answer in one word.")
    modelfile = save_pretrained_ollama(tiny.model("llama"), tmp_path / "out", tok, quantization_method="q8_0")
    text = modelfile.read_text()
    assert text.startswith("FROM ./model-Q8_0.gguf\nTEMPLATE \"\"\"")
    assert '{{ if eq .Role "user" }}' in text or 'else if eq .Role "user"' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You answer in one word."""' in text


def test_push_to_hub_gguf_offline_keeps_the_local_files(tok, tmp_path, monkeypatch):
    from velotune.export import HubUploadError, push_to_hub_gguf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUploadError, match="export itself is complete"):
        push_to_hub_gguf(tiny.model("llama"), "someone/tiny-gguf", tok, quantization_method="q8_0",
                         save_directory=tmp_path / "local", verify=False)
    assert (tmp_path / "local" / "model-Q8_0.gguf").is_file() and (tmp_path / "local" / "Modelfile").is_file()
