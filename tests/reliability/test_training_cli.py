"""The command line's user errors (issue 14, "confusing today"): one clear line and exit code 2, found before
any model loads; numbers written as people write them; --debug shows the traceback."""

from __future__ import annotations

import pytest

from velotune.cli import ConfigError, load_config, main

MISSING_MODEL = "model:\n  model_name: /nonexistent/model-folder\n"  # loading it would fail: checks come first


def _run(tmp_path, monkeypatch, capsys, yaml_text, *extra):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    code = main(["train", str(config), *extra])
    err = capsys.readouterr().err
    return code, err


def test_learning_rate_written_2e_4_is_a_number(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  learning_rate: 2e-4\n  weight_decay: 1E-2\n  warmup_steps: 3\n")
    loaded = load_config(config)
    assert loaded["training"]["learning_rate"] == 2e-4 and isinstance(loaded["training"]["learning_rate"], float)
    assert loaded["training"]["weight_decay"] == 0.01 and loaded["training"]["warmup_steps"] == 3
    from velotune.cli_checks import check_types

    check_types(loaded, config)  # accepted


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_yaml_syntax_error_names_line_and_column(tmp_path, monkeypatch, capsys):
    code, err = _run(tmp_path, monkeypatch, capsys, "training:\n  max_steps: 3\n  output_dir: [unclosed\n")
    line = _one_line(err)
    assert code == 2 and "YAML syntax error at line" in line and "column" in line


def test_a_bad_type_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    code, err = _run(tmp_path, monkeypatch, capsys, MISSING_MODEL + "training:\n  per_device_train_batch_size: four\n")
    line = _one_line(err)
    assert code == 2 and "training.per_device_train_batch_size: expected int, got str 'four'" in line


def test_an_unknown_quantization_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    code, err = _run(tmp_path, monkeypatch, capsys, MISSING_MODEL + "export:\n  gguf: [q4_k_m, q9_z]\n")
    line = _one_line(err)
    assert code == 2 and "unknown quantization 'q9_z'" in line and "q4_k_m" in line


@pytest.mark.parametrize("content", [None, b'{"text": "ok"}\n{"text": "caf\xe9"}\n'])
def test_an_unreadable_data_file_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys, content):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_bytes(content)
    code, err = _run(tmp_path, monkeypatch, capsys, MISSING_MODEL + f"data:\n  path: {data}\n")
    line = _one_line(err)
    assert code == 2 and str(data) in line
    if content is not None:
        assert "row 2" in line and "UTF-8" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(MISSING_MODEL + "training:\n  per_device_train_batch_size: four\n")
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        main(["train", str(config), "--debug"])


def test_export_names_an_unknown_quantization_before_loading(tmp_path, capsys):
    code = main(["export", str(tmp_path / "no-such-model"), str(tmp_path / "out"), "--gguf", "q4_k_m", "q9_z"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "unknown quantization 'q9_z'" in line
    assert not (tmp_path / "out").exists()
