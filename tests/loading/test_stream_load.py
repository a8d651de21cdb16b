"""Streaming load (models/stream_load.py): a sharded 16-bit folder loads into 4-bit / 8-bit / FP8 layer by
layer, with the same bytes as quantizing the whole loaded model, and without ever holding the whole 16-bit
model. Folders: 3 bf16 shards whose boundaries cut through decoder layers (tests/tiny/sharded.py)."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

pytest.importorskip("bitsandbytes")

from velotune import checkpoint_shards  # noqa: E402
from velotune.models.from_folder import load_config, load_own, model_class  # noqa: E402
from velotune.quant import quantize_model_  # noqa: E402
from velotune.quant.fp8 import quantize_model_fp8_  # noqa: E402
from velotune.quant.int8 import quantize_model_int8_  # noqa: E402
from velotune.resolve import resolve_source  # noqa: E402

from tiny.families import make_hf  # noqa: E402
from tiny.sharded import write_sharded  # noqa: E402

DTYPE = torch.bfloat16
CPU = torch.device("cpu")
SKIP = ("lm_head",)
# The whole-model quantization that loading did before streaming: load everything, then quantize.
WHOLE = {
    "nf4": lambda model: quantize_model_(model, skip_modules=SKIP, compute_dtype=DTYPE),
    "int8": lambda model: quantize_model_int8_(model, skip_modules=SKIP),
    "fp8": lambda model: quantize_model_fp8_(model, skip_modules=SKIP, compute_dtype=DTYPE),
}
# llama: plain; qwen2: q/k/v biases; qwen3: tied embeddings, q/k norms; gemma3: 4 layers, sandwich norms;
# phi3: fused qkv / gate_up checkpoint tensors split on load.
CASES = [("llama", "nf4"), ("qwen2", "nf4"), ("qwen3", "nf4"), ("gemma3", "nf4"), ("phi3", "nf4"),
         ("llama", "int8"), ("phi3", "int8"), ("qwen2", "fp8"), ("gemma3", "fp8")]


def _load(folder, quant, device: torch.device = CPU):
    source = resolve_source(str(folder))
    config = load_config(source, False)
    return load_own(model_class(config, False), source, config, DTYPE, device, quant)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


@pytest.mark.parametrize("family, quant", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_streamed_layers_equal_the_whole_model_quantized(tmp_path, family, quant):
    groups = write_sharded(make_hf(family), tmp_path, DTYPE)
    assert len(groups) == 3
    streamed = _load(tmp_path, quant)
    whole = _load(tmp_path, None)  # 16-bit, then quantized as one model
    quantized = WHOLE[quant](whole)
    assert len(quantized) == 7 * len(whole.model.layers)
    assert [(n, type(m)) for n, m in streamed.named_modules()] == [(n, type(m)) for n, m in whole.named_modules()]
    expected, actual = whole.state_dict(), streamed.state_dict()
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
        assert torch.equal(_bytes(actual[name]), _bytes(value)), name
    if streamed.config.tie_word_embeddings:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


class LiveProjections:
    """Which decoder-layer projection weights that shards brought are still alive, by their storage:
    a weak reference to each one read, counted every time the loader asks for the next file."""

    def __init__(self, read):
        self.read, self.refs, self.counts = read, {}, []

    def __call__(self, file):
        self.counts.append(self.alive())
        tensors = self.read(file)
        self.refs.update({k: StorageWeakRef(v.untyped_storage()) for k, v in tensors.items()
                          if ".layers." in k and k.endswith("_proj.weight")})
        return tensors

    def alive(self) -> int:
        return sum(not ref.expired() for ref in self.refs.values())


@pytest.mark.parametrize("quant", ["nf4", "int8", "fp8"])
def test_at_most_one_16bit_layer_is_alive_while_loading(tmp_path, monkeypatch, quant):
    """Loading the whole folder first held every layer read so far (before streaming: 29 of the 42
    projections when the third shard is read); streaming holds only the layer a boundary cut (< 7)."""
    write_sharded(_six_layer_llama(), tmp_path, DTYPE)
    spy = LiveProjections(checkpoint_shards._read)
    monkeypatch.setattr(checkpoint_shards, "_read", spy)
    model = _load(tmp_path, quant)
    assert len(WHOLE[quant](model)) == 0  # nothing left to quantize
    assert len(spy.counts) == 3 and len(spy.refs) == 7 * 6
    assert max(spy.counts) < 7, spy.counts  # part of one layer
    assert spy.alive() == 0  # every 16-bit projection was replaced by its quantized form


def _six_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_repeated_unused_and_missing_tensors(tmp_path, caplog):
    """A repeated weight of a layer already quantized is refused by name; an unknown tensor of such a layer (an
    old checkpoint's rotary inv_freq) is only noticed; a missing weight is named."""
    groups = write_sharded(make_hf("llama"), tmp_path, DTYPE)
    from safetensors.torch import load_file, save_file

    first = tmp_path / "model-00001-of-00003.safetensors"
    up = "model.layers.0.mlp.up_proj.weight"
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    last = tmp_path / "model-00003-of-00003.safetensors"  # layer 0 was complete after shard 2
    kept = load_file(last) | {inv_freq: torch.ones(8)}
    save_file(kept | {up: load_file(first)[up]}, str(last), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{up}.*belongs to decoder layer 0, which earlier shards"):
        _load(tmp_path, "nf4")
    save_file(kept, str(last), metadata={"format": "pt"})
    _load(tmp_path, "nf4")
    assert f"checkpoint tensors not used by the model: ['{inv_freq}']" in caplog.text
    cut = groups[1][0]  # the first tensor of shard 2 (its layer began in shard 1)
    second = tmp_path / "model-00002-of-00003.safetensors"
    save_file({k: v for k, v in load_file(second).items() if k != cut}, str(second), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"checkpoint is missing 1 weights, e.g. \['{cut}'\]"):
        _load(tmp_path, "nf4")
