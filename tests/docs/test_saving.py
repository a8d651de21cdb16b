"""The docs' saving and export snippets ("Saving to GGUF", "Saving to VLLM", "Running & Saving
Models"), run on a LoRA model as the notebook has it after training (a tiny random Llama with
SmolLM2's tokenizer: the snippets only use `model` and `tokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from velotune.export import ALLOWED_QUANTS, HubUploadError
from velotune.quant.gguf.methods import UNSUPPORTED_QUANTS, normalize_method

from .snippets import Sub, find_block, run_snippet, run_statements


def notebook(tiny_lora) -> dict:
    model, tokenizer = tiny_lora
    return {"model": model, "tokenizer": tokenizer}


def file_type(path: Path) -> int:
    return int(gguf.GGUFReader(path).fields["general.file_type"].parts[-1][0])


def test_save_gguf(tiny_lora):
    run_snippet(find_block('model.save_pretrained_gguf("dir", tokenizer, quantization_method = "q4_k_m")'),
                namespace=notebook(tiny_lora))
    files = {p.name: p for p in Path("dir").glob("*.gguf")}
    assert sorted(files) == ["model-F16.gguf", "model-Q4_K_M.gguf", "model-Q8_0.gguf"], sorted(files)
    assert file_type(files["model-Q4_K_M.gguf"]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert file_type(files["model-Q8_0.gguf"]) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert file_type(files["model-F16.gguf"]) == gguf.LlamaFileType.MOSTLY_F16


def test_push_to_hub_gguf_offline(tiny_lora):
    """Offline, each push writes the complete local folder, then fails naming it (nothing lost)."""
    results = run_statements(find_block('model.push_to_hub_gguf("hf_username/dir"'), namespace=notebook(tiny_lora))
    assert len(results) == 2
    for source, error in results:
        assert isinstance(error, HubUploadError), (source, error)
        assert str(Path("dir").resolve()) in str(error)
    assert sorted(p.name for p in Path("dir").glob("*.gguf")) == ["model-Q4_K_M.gguf", "model-Q8_0.gguf"]


def test_allowed_quants():
    """Every method of the docs' table is accepted, except the i-quants, which fail naming the choices."""
    documented = run_snippet(find_block("ALLOWED_QUANTS = \\"))["ALLOWED_QUANTS"]
    refused = set()
    for method in documented:
        try:
            normalize_method(method)
        except ValueError as error:
            assert "not supported by velotune" in str(error) and "q4_k_m" in str(error), str(error)
            refused.add(method)
    assert refused == set(UNSUPPORTED_QUANTS)
    assert set(documented) - refused <= set(ALLOWED_QUANTS)


def test_save_merged_for_llama_cpp(tiny_lora):
    run_snippet(find_block('model.save_pretrained_merged("merged_model"'), namespace=notebook(tiny_lora))
    folder = Path("merged_model")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()


def test_save_merged_16bit(tiny_lora):
    results = run_statements(find_block('save_method = "merged_16bit", token = "")'), namespace=notebook(tiny_lora))
    (save, saved), (push, pushed) = results
    assert saved is None, saved
    assert isinstance(pushed, HubUploadError), pushed
    assert list(Path("model").glob("*.safetensors")) and not list(Path("model").glob("adapter_*"))


def test_save_merged_4bit(tiny_lora):
    """The docs: "first call merged_4bit. Then use merged_4bit_forced if you are certain": the first
    call refuses, explaining why and naming merged_4bit_forced; nothing is written."""
    results = run_statements(find_block('save_method = "merged_4bit", token = "")'), namespace=notebook(tiny_lora))
    for source, error in results:
        assert isinstance(error, ValueError) and "merged_4bit_forced" in str(error), (source, error)
    assert not Path("model").exists() or not list(Path("model").glob("*.safetensors"))


def test_save_lora(tiny_lora):
    results = run_statements(find_block('save_method = "lora", token = "")'), namespace=notebook(tiny_lora))
    (save, saved), (push, pushed) = results
    assert saved is None, saved
    assert isinstance(pushed, HubUploadError), pushed
    folder = Path("model")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert (folder / "tokenizer.json").is_file()


def test_save_adapter_and_tokenizer(tiny_lora):
    """Pseudo-code in the docs (`(...)` and `AND`): the substitutions make it the two calls it names."""
    block = find_block("model.save_pretrained(...) AND tokenizer.save_pretrained(...)")
    run_snippet(block, [Sub("save_pretrained(...) AND tokenizer", 'save_pretrained("lora_model")\ntokenizer',
                            "the docs write `AND` between the two calls"),
                        Sub("tokenizer.save_pretrained(...)", 'tokenizer.save_pretrained("lora_model")',
                            "`...` is the folder")], namespace=notebook(tiny_lora))
    folder = Path("lora_model")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.bin"))
