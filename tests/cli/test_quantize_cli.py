"""`velotune quantize MODEL OUT [--dynamic ...]` (issue 18 item 4) on the tiny Llama folder: the folders it
writes, the saved table, and one clear line for a budget below the all-4-bit size."""

from __future__ import annotations

import json

import pytest

from velotune.cli import main

pytest.importorskip("bitsandbytes")


def test_quantize_dynamic_writes_folder_and_table(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "dyn"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--dynamic", "--max-tokens", "1024", "--no-eval"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "dynamic_4bit.json").read_text())
    assert f"written to {out}" in printed and f"{len(report['kept'])} of 14 layers kept in 16-bit" in printed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", *report["kept"]] and report["perplexity"] == {}
    assert report["bytes_all_4bit"] < report["bytes_dynamic"] <= 1.10 * report["bytes_all_4bit"]  # default budget
    assert (out / "dynamic_4bit.md").read_text().count("| model.layers.") == 14


def test_plain_quantize_and_bad_input(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "nf4")]) == 0
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["llm_int8_skip_modules"] == ["lm_head"]
    capsys.readouterr()
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "small"), "--dynamic", "--budget-gib", "0.00001"]) == 2
    error = capsys.readouterr().err
    assert "budget_gib=1e-05 is smaller than this model with every candidate layer in 4-bit" in error
    assert "(--budget-gib) 0.0" in error and "\n" not in error.strip()
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "x"), "--budget-gib", "1"]) == 2
    assert "only --dynamic does" in capsys.readouterr().err
