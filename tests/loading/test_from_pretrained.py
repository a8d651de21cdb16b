"""FastLanguageModel.from_pretrained: every source, precision rules, tokenizer fixing, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from velotune import FastLanguageModel
from velotune.models import DecoderForCausalLM
from velotune.quant import is_linear4bit, linear4bit_state_dict, nf4_available, quantize_model_

from tiny.folders import tiny_llama_config, tiny_tokenizer, write_tiny_llama

IDS = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 5, 9, 33]])


def _same_logits(ours, reference, atol=1e-5):
    with torch.no_grad():
        a = ours(IDS).logits
        b = reference(IDS).logits
    assert (a - b).abs().max().item() < atol


@pytest.mark.parametrize("shard_size, safe", [(None, True), ("40KB", True), (None, False)],
                         ids=["safetensors", "sharded", "bin"])
def test_local_folder_formats(tmp_path, shard_size, safe):
    reference = write_tiny_llama(tmp_path, shard_size=shard_size, safe=safe)
    if shard_size:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    assert isinstance(model, DecoderForCausalLM)
    assert model.dtype == torch.float32  # dtype=None on the CPU
    _same_logits(model, reference)


def test_gguf_file_loads_dequantized(tmp_path):
    """A GGUF file of quantized tensors (Q8_0; tied embeddings and a byte-level BPE vocabulary inside, as in
    SmolLM2's file) loads through transformers' reader into our class: the logits are transformers' own for the
    file and within Q8_0 rounding of the model written; the tokenizer comes from the file.

    Tiny on purpose: the real SmolLM2 file took 48 s of CI here, transformers parsing its 49K-token vocabulary
    four times (two configs, tokenizer, weights); the conversion of that file is the smollm2 fixture's."""
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaForCausalLM

    from velotune.export import save_pretrained_gguf
    from velotune.models import model_class_for

    from tiny import export_shapes

    config = export_shapes.CONFIGS["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    written = model_class_for(config)(config)
    with torch.no_grad():
        for param in written.parameters():
            param.add_(torch.randn_like(param) * 0.1) if param.dim() == 1 else param.normal_(0, 0.05)
    tok = export_shapes.tokenizer()
    [path] = save_pretrained_gguf(written.eval(), tmp_path, tok, quantization_method="q8_0", verify=False)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: the embedding is the output layer

    model, tokenizer = FastLanguageModel.from_pretrained(str(path), device_map="cpu", load_in_4bit=False)
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, DecoderForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    text = "What is the capital of France? The capital of France is Paris."
    assert tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    # Q8_0 rounds each weight to half a step of its 32-block's absmax/127: within 1/254 of the tensor's largest
    # (measured worst 3.93e-3; 5e-3 leaves room for the fp16 scales), and really rounded, not a float copy
    loaded, source = model.state_dict(), written.state_dict()
    assert loaded.keys() == source.keys()
    errors = {name: ((loaded[name] - w).abs().max() / w.abs().max()).item() for name, w in source.items()}
    assert max(errors.values()) < 5e-3 and errors["model.layers.0.self_attn.q_proj.weight"] > 0, errors
    reference = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():  # transformers' own reading of the same file
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_missing_path_names_every_place(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FastLanguageModel.from_pretrained(str(tmp_path / "nope"), device_map="cpu")
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        FastLanguageModel.from_pretrained("someone/not-a-model")
    message = str(info.value)
    assert "local path" in message and "Hugging Face cache" in message and "hub" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "model.gguf"), device_map="cpu")


def test_generic_path_for_other_causal_lms(tmp_path, caplog):
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)).eval()
    reference.save_pretrained(tmp_path)
    tiny_tokenizer(with_pad=True).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    assert isinstance(model, GPT2LMHeadModel)
    assert sum("generic path" in r.message for r in caplog.records) == 1
    _same_logits(model, reference)


@pytest.mark.parametrize("model_type", ["vit", "not-a-model-type"])
def test_unknown_model_type_lists_supported_families(tmp_path, model_type):
    (tmp_path / "config.json").write_text('{"model_type": "%s", "hidden_size": 32}' % model_type)
    with pytest.raises(ValueError) as info:
        FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
        assert family in str(info.value)


def test_pad_token_is_never_eos(tmp_path):
    write_tiny_llama(tmp_path, with_pad=False)
    _, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_pad_token_added_when_nothing_fits(tmp_path):
    reference = write_tiny_llama(tmp_path, with_pad=False, vocab_size=len(tiny_tokenizer()))  # no spare row
    tokenizer = tiny_tokenizer()
    tokenizer.unk_token = "</s>"  # no spare token left: unk == eos
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    assert tokenizer.pad_token == "<|PAD_TOKEN|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) > reference.config.vocab_size
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_bad_dtype_and_lengths(tmp_path):
    write_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", dtype="float8", load_in_4bit=False)
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", max_seq_length=0, load_in_4bit=False)


def test_long_max_seq_length_warns_and_keeps_short_outputs(tmp_path, caplog):
    reference = write_tiny_llama(tmp_path)  # 128 positions
    with caplog.at_level(logging.WARNING, logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", max_seq_length=1024, load_in_4bit=False)
    assert any("exceeds the 128 positions" in r.message for r in caplog.records)
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    _same_logits(model, reference)  # within trained positions nothing changes
    with torch.no_grad():
        out = model(torch.randint(3, 90, (1, 300))).logits
    assert torch.isfinite(out).all()


def test_explicit_rope_scaling(tmp_path):
    write_tiny_llama(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False,
                                                 rope_scaling={"type": "linear", "factor": 2.0})
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2.0


needs_nf4 = pytest.mark.skipif(not nf4_available("cpu")[0], reason="bitsandbytes 4-bit cannot run on this CPU")


@needs_nf4
def test_load_in_4bit_quantizes_all_but_lm_head(tmp_path):
    import bitsandbytes as bnb

    reference = write_tiny_llama(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=True)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_state.nested  # double quantization
    with torch.no_grad():
        a, b = model(IDS).logits, reference(IDS).logits
    # NF4 error on tiny random weights: logits stay close, not equal.
    assert (a - b).abs().max().item() < 0.1 * b.abs().max().item()


@needs_nf4
def test_prequantized_bnb_folder_loads(tmp_path):
    """A 'bnb-4bit' folder (bitsandbytes key layout + quantization_config) loads as 4-bit, and
    dequantized when 4-bit is not asked for."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = write_tiny_llama(tmp_path / "src")
    quantized = type(reference)(reference.config).eval()
    quantized.load_state_dict(reference.state_dict())
    names = quantize_model_(quantized, skip_modules=("lm_head",))
    state = {k: v for k, v in quantized.state_dict().items() if not any(k.startswith(n + ".weight") for n in names)}
    for name in names:
        state.update(linear4bit_state_dict(quantized.get_submodule(name), name))
    folder = tmp_path / "bnb-4bit"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = reference.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "llm_int8_skip_modules": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(with_pad=True).save_pretrained(folder)

    with torch.no_grad():
        expected = quantized(IDS).logits
    model4, _ = FastLanguageModel.from_pretrained(str(folder), device_map="cpu", load_in_4bit=True)
    model16, _ = FastLanguageModel.from_pretrained(str(folder), device_map="cpu", load_in_4bit=False)
    assert is_linear4bit(model4.model.layers[0].mlp.up_proj)
    assert type(model16.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        assert (model4(IDS).logits - expected).abs().max().item() < 1e-4
        assert (model16(IDS).logits - expected).abs().max().item() < 1e-4


def test_foreign_quantization_refused(tmp_path):
    import json

    write_tiny_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq"):
        FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)


def test_full_finetuning_trains_everything(tmp_path):
    write_tiny_llama(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # 4-bit dropped for full training
    assert FastLanguageModel.get_peft_model(model) is model


def test_tied_embeddings_stay_tied(tmp_path):
    write_tiny_llama(tmp_path, tie_word_embeddings=True)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), device_map="cpu", load_in_4bit=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tiny_llama_config().tie_word_embeddings is False
