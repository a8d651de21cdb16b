"""The command line on the real SmolLM2 fixture: a YAML config trains and saves an adapter, the
export command writes a merged folder, chat answers; bad configs name the allowed keys."""

import pytest

from velotune.cli import ConfigError, chat, export_model, load_config, main


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_unknown_keys_name_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank'\] in section 'lora'; allowed: .*'r'"):
        load_config(write(tmp_path, "lora:\n  rank: 8\n"))
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(write(tmp_path, "optimizer: {}\n"))
    assert main(["train", str(write(tmp_path, "training:\n  learnin_rate: 1\n"))]) == 2


def test_config_keys_are_the_python_names(tmp_path):
    config = load_config(write(tmp_path, "model:\n  max_seq_length: 64\ntraining:\n  max_steps: 3\n"
                                         "data:\n  path: d.jsonl\n"))
    assert config["model"]["max_seq_length"] == 64 and config["model"]["load_in_4bit"] is False
    assert config["training"]["max_steps"] == 3 and config["data"] == {"path": "d.jsonl"}


@pytest.mark.slow
def test_train_export_chat(smollm2, tmp_path):
    import json

    rows = [{"conversations": [{"from": "human", "value": f"What is {i}+{i}?"}, {"from": "gpt", "value": f"{2 * i}."}]}
            for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = write(tmp_path, f"model:\n  max_seq_length: 64\n  device_map: cpu\ndata:\n  path: {data}\n"
                             f"training:\n  max_steps: 2\n  output_dir: {out}\n  per_device_train_batch_size: 4\n")
    assert main(["train", str(config)]) == 0
    adapter = out / "lora_model"
    assert (adapter / "adapter_config.json").exists() and (adapter / "loss.png").exists() is False
    merged = export_model(str(adapter), str(tmp_path / "exports"), merged="merged_16bit")
    assert (merged / "merged_16bit" / "config.json").exists()
    answer = chat(str(adapter), prompt="What is the capital of France?", max_new_tokens=12)
    assert isinstance(answer, str) and answer.strip()
