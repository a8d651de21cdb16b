"""Local files in the seed's formats load through `datasets`; each bad input names file, row, problem."""

import json

import pytest

from velotune.data import DataFormatError, load_local_dataset, validate_dataset

GOOD = {
    "text": [{"text": "Pasta carbonara is a Roman dish."}, {"text": "Guanciale is cured pork cheek."}],
    "alpaca": [{"instruction": "Add.", "input": "1, 2", "output": "3"}, {"instruction": "Greet.", "input": "", "output": "Hi"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}],
    "openai": [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]}],
    "dpo": [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
    "kto": [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": False}],
    "grpo": [{"prompt": "2+2?", "answer": "4"}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_each_format_loads_from_jsonl_and_json(fmt, tmp_path):
    ds = load_local_dataset(write_jsonl(tmp_path / "d.jsonl", GOOD[fmt]))
    assert len(ds) == len(GOOD[fmt]) and validate_dataset(ds) == fmt
    (tmp_path / "d.json").write_text(json.dumps(GOOD[fmt]), encoding="utf-8")
    assert load_local_dataset(tmp_path / "d.json", format=fmt).num_rows == len(GOOD[fmt])


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(GOOD["alpaca"])
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    assert load_local_dataset(tmp_path / "a.csv")[0]["output"] == "3"
    assert load_local_dataset(tmp_path / "a.parquet", format="alpaca")[1]["instruction"] == "Greet."


def test_excel(tmp_path):
    pytest.importorskip("openpyxl")
    import pandas as pd

    pd.DataFrame(GOOD["dpo"]).to_excel(tmp_path / "d.xlsx", index=False)
    assert load_local_dataset(tmp_path / "d.xlsx")[0]["chosen"] == "4"  # a number typed in a cell stays text
    pd.DataFrame(GOOD["kto"]).to_excel(tmp_path / "k.xlsx", index=False)
    assert load_local_dataset(tmp_path / "k.xlsx")["label"] == [True, False]


def test_excel_without_openpyxl_names_the_install(tmp_path):
    try:
        import openpyxl  # noqa: F401
        pytest.skip("openpyxl is installed")
    except ImportError:
        pass
    (tmp_path / "d.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(ImportError, match="pip install openpyxl"):
        load_local_dataset(tmp_path / "d.xlsx")


BAD_ROWS = [
    ("alpaca", [GOOD["alpaca"][0], {"instruction": "x", "input": ""}], 2, "column 'output' is missing or empty"),
    ("alpaca", [GOOD["alpaca"][0], {"instruction": " ", "input": "", "output": "y"}], 2, "column 'instruction' is empty"),
    ("text", [{"text": "a"}, {"text": ""}, {"text": "c"}], 2, "column 'text' is empty"),
    ("sharegpt", [GOOD["sharegpt"][0], {"conversations": []}], 2, "empty conversation"),
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                     {"from": "gpt", "value": "c"}]}], 1, "roles must alternate user/assistant"),
    ("sharegpt", [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}], 1,
     "turn 0 is 'assistant'"),
    ("openai", [{"messages": [{"role": "user", "content": "a"}]}], 1, "no assistant message"),
    ("openai", [{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}], 1,
     "unknown role 'wizard'"),
    ("openai", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "system", "content": "c"}]}], 1, "a system message may only open"),
    ("dpo", [GOOD["dpo"][0], {"prompt": "p", "chosen": "c"}], 2, "column 'rejected' is missing or empty"),
    ("kto", [GOOD["kto"][0], {"prompt": "p", "completion": "c", "label": None}], 2, "column 'label' must be true/false"),
    ("grpo", [GOOD["grpo"][0], {"prompt": "p", "answer": None}], 2, "missing column 'answer'"),
    ("dpo", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": ["c"], "rejected": "r"}], 2,
     "column 'chosen' must be text, got list"),
]


@pytest.mark.parametrize("fmt,rows,row,problem", BAD_ROWS)
def test_bad_rows_name_file_row_and_problem(fmt, rows, row, problem, tmp_path):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    with pytest.raises(DataFormatError) as err:
        load_local_dataset(path, format=fmt)
    assert err.value.path == str(path) and err.value.row == row
    assert problem in str(err.value) and f"{path}, row {row}:" in str(err.value)


def test_alternation_can_be_relaxed(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                               {"from": "gpt", "value": "c"}]}]
    assert len(load_local_dataset(write_jsonl(tmp_path / "c.jsonl", rows), alternate_roles=False)) == 1


def test_wrong_type_in_a_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 3}])
    with pytest.raises(DataFormatError, match=r"row 3: column 'text' must be text, got int 3"):
        load_local_dataset(path)


def test_wrong_type_that_arrow_accepts(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["a", "b"], "completion": ["c", "d"], "label": ["yes", "no"]}).to_csv(tmp_path / "k.csv", index=False)
    with pytest.raises(DataFormatError, match=r"row 1: column 'label' must be true/false, got 'yes'"):
        load_local_dataset(tmp_path / "k.csv")


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n["x"]\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"rows.jsonl, row 2: each row must be an object, got list"):
        load_local_dataset(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad.jsonl, row 2: invalid JSON"):
        load_local_dataset(path)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_local_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="empty.jsonl: the file is empty"):
        load_local_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "blank.csv").write_text("text\n")
    with pytest.raises(DataFormatError, match="blank.csv: the file holds no rows"):
        load_local_dataset(tmp_path / "blank.csv")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="unsupported extension '.txt'"):
        load_local_dataset(tmp_path / "d.txt")


def test_unrecognised_columns(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the data format from columns \\['a', 'b'\\]"):
        load_local_dataset(write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}]))


def test_seed_datasets_101_examples(tmp_path):
    """The three formats exactly as the seed's "Datasets 101" page writes them: raw text, Alpaca with
    capitalised keys, and ShareGPT whose assistant turns say "from": "assistant"."""
    import json

    from velotune.chat_templates import standardize_sharegpt

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "Pasta carbonara is a traditional Roman pasta dish."}) + "\n")
    assert load_local_dataset(tmp_path / "t.jsonl")[0]["text"].startswith("Pasta")
    (tmp_path / "a.jsonl").write_text(json.dumps({"Instruction": "Task we want the model to perform.",
                                                  "Input": "Optional", "Output": "The expected result."}) + "\n")
    alpaca = load_local_dataset(tmp_path / "a.jsonl", format="alpaca")
    assert alpaca[0] == {"instruction": "Task we want the model to perform.", "input": "Optional",
                         "output": "The expected result."}
    convo = {"conversations": [{"from": "human", "value": "Can you help me make pasta carbonara?"},
                               {"from": "assistant", "value": "Traditional or simple?"},
                               {"from": "human", "value": "The traditional version please"},
                               {"from": "assistant", "value": "Pasta, guanciale, eggs, Pecorino, pepper."}]}
    (tmp_path / "c.json").write_text(json.dumps([convo]))
    roles = [m["role"] for m in standardize_sharegpt(load_local_dataset(tmp_path / "c.json"))[0]["conversations"]]
    assert roles == ["user", "assistant", "user", "assistant"]
