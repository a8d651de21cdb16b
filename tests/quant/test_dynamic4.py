"""Dynamic 4-bit (issue 18 item 4): the error meter's arithmetic, the choice under a budget, the folder
(velotune and transformers load it, kept layers in 16-bit), and on the real SmolLM2 a held-out perplexity
closer to the 16-bit model than plain NF4's at no more than 10% extra memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from velotune.quant import dequantize_nf4_state, is_linear4bit, linear4bit_state_dict, quantize_nf4, to_linear4bit  # noqa: E402
from velotune.quant.dynamic import Candidate, OutputErrorMeter, choose_16bit, nf4_nbytes, nf4_roundtrip  # noqa: E402


@pytest.mark.parametrize("shape,dtype", [((96, 64), torch.bfloat16), ((33, 70), torch.float32), ((7, 9), torch.float16)])
def test_roundtrip_is_quantize_then_dequantize_and_sizes_are_the_files(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(nf4_roundtrip(w), dequantize_nf4_state(*quantize_nf4(w)))
    layer = to_linear4bit(nn.Linear(shape[1], shape[0], bias=False).to(dtype))
    written = sum(t.numel() * t.element_size() for t in linear4bit_state_dict(layer, "x").values())
    assert abs(nf4_nbytes(w.numel()) - written) <= 24  # only the JSON quant_state's length is estimated


def test_meter_measures_the_output_error_of_nf4():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    x = torch.randn(3, 5, 64)
    with OutputErrorMeter({"l": layer}, torch.float32, cache=True) as meter, torch.no_grad():
        layer(x)
        layer(x[:1])
    q = nf4_roundtrip(layer.weight.detach())
    flat = torch.cat([x.reshape(-1, 64), x[:1].reshape(-1, 64)])  # (20, 64): both batches add up
    expected = (flat @ (layer.weight.detach() - q).T).square().sum().item()
    reference = (flat @ layer.weight.detach().T).square().sum().item()
    error, ref = meter.sums["l"]
    assert error == pytest.approx(expected, rel=1e-5) and ref == pytest.approx(reference, rel=1e-5)
    assert torch.equal(meter.roundtrips["l"], q)
    assert not layer._forward_hooks  # hooks removed on exit


def test_choice_takes_the_worst_that_fit():
    rows = [Candidate("a", 100, 200, 60, error=5.0, rel_error=0.1), Candidate("big", 1000, 2000, 600, 9.0, 0.1),
            Candidate("b", 100, 200, 60, 3.0, 0.1), Candidate("c", 100, 200, 60, 1.0, 0.1),
            Candidate("zero", 100, 200, 60, 0.0, 0.0)]
    assert choose_16bit(rows, 300) == ["a", "b"]  # "big" (1400 extra) does not fit; a, b (140 each) do, c no more
    assert choose_16bit(rows, 1400) == ["big"]
    assert choose_16bit(rows, 10_000) == ["big", "a", "b", "c"]  # a layer NF4 does not change never costs memory
    assert choose_16bit(rows, 0) == []


def test_smollm2_dynamic_is_closer_to_16bit_than_nf4(smollm2, one_thread):
    """The real model, a few hundred tokens: the held-out split never saw calibration; the weights are back
    after the in-memory evaluation."""
    from velotune.quantize import choose_dynamic

    model, tokenizer = smollm2
    before = model.model.layers[11].mlp.down_proj.weight.detach().clone()
    report = choose_dynamic(model, tokenizer, max_tokens=256, seq_len=256, batch=1, heldout_tokens=256)
    ppl = report.perplexity
    assert report.calibration_tokens == 256 and report.heldout_tokens == 256
    assert ppl["16-bit"] < ppl["dynamic"] < ppl["nf4"], ppl
    assert ppl["nf4"] - ppl["dynamic"] > 0.25 * (ppl["nf4"] - ppl["16-bit"]), ppl  # measured: 0.62 of the gap
    assert report.kept and report.bytes_all_4bit < report.bytes_dynamic <= 1.10 * report.bytes_all_4bit
    assert len(report.candidates) == 30 * 7 and not report.always_16bit
    assert torch.equal(model.model.layers[11].mlp.down_proj.weight, before)


def test_folder_loads_in_velotune_and_transformers_with_kept_layers_16bit(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from velotune import FastLanguageModel
    from velotune.export.verify import same_on_every_cpu
    from velotune.fast.plan import runtime_settings, set_fast_path
    from velotune.quantize import REPORT_JSON, REPORT_TABLE, all_4bit_bytes, quantize_dynamic

    # a model in memory (the CLI test covers names/folders); fp32 "16-bit" layers and compute, so velotune's and
    # transformers' loads compare closely; a budget with room for about two MLP projections
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, device_map="cpu",
                                                         max_seq_length=64)
    # the fast path (CUDA's default) fuses the projections past the meter's hooks: measuring must still see them
    set_fast_path(model, True)
    two_mlp = 2 * (64 * 32 * 4 - nf4_nbytes(64 * 32))
    budget = (all_4bit_bytes(model, torch.float32) + two_mlp + 500) / 2**30
    report = quantize_dynamic(model, tmp_path / "out", tokenizer=tokenizer, max_tokens=512, seq_len=64,
                              budget_gib=budget, dtype=torch.float32, evaluate=False)  # verify: loads it in both
    folder = tmp_path / "out"
    assert report.kept and all(c.error > 0 for c in report.candidates), report.table()
    assert runtime_settings(model).fast_path is True  # the user's setting is back
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["llm_int8_skip_modules"] == ["lm_head", *report.kept]
    saved = json.loads((folder / REPORT_JSON).read_text())
    assert saved["kept"] == report.kept and len(saved["candidates"]) == 14
    assert all(row["name"] in (folder / REPORT_TABLE).read_text() for row in saved["candidates"])

    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32, device_map="cpu")
    worst = max(report.candidates, key=lambda c: c.error)
    assert report.bytes_dynamic <= report.bytes_budget and report.kept[0] == worst.name
    # transformers' layers compute velotune's NF4 math, as in the export check (bitsandbytes' AVX512 CPU path differs)
    theirs = same_on_every_cpu(AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval())
    for loaded in (model, theirs):
        for c in report.candidates:
            module = loaded.get_submodule(c.name)
            assert is_linear4bit(module) == (c.name not in report.kept), c.name
    ids = torch.tensor([[5, 17, 30, 41, 2, 60, 12]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_budget_below_all_4bit_names_the_minimum(tiny_llama_dir, tmp_path):
    from velotune.quantize import quantize_dynamic

    with pytest.raises(ValueError, match=r"budget_gib=1e-06 is smaller .* at least 0\.0\d+ GiB \([\d,]+ bytes\)"):
        quantize_dynamic(str(tiny_llama_dir), tmp_path / "out", budget_gib=1e-6, seq_len=64)
    assert not (tmp_path / "out").exists()
