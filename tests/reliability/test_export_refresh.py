"""Issue 14, item 1 and the export-side "confusing" items: an export into a folder that holds an
earlier velotune export replaces it whole (no stale shard or index can shadow the new weights),
never deletes what velotune did not write, recovers from its own crashed half-files, and names
the file when the disk or the file-size limit runs out."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import export_shapes as tiny  # noqa: E402
from export.conftest import logits, lora  # noqa: E402

from velotune.export import save_pretrained_gguf, save_pretrained_merged  # noqa: E402
from velotune.export.folders import MARKER  # noqa: E402
from velotune.models.from_folder import load_weights  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def _change_adapter(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_reexport_replaces_sharded_export_whole(tok, tmp_path):
    model = lora(tiny.model("llama"))
    folder = tmp_path / "out"
    save_pretrained_merged(model, folder, tok, max_shard_size="600KB")
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "notes.txt").write_text("mine")  # the user's file, beside the export
    _change_adapter(model, seed=7)
    expected = logits(model)
    save_pretrained_merged(model, folder, tok)  # its check loads through velotune's loader too
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if "-of-" in n or n.endswith(".index.json") or n.endswith(".partial")], names
    assert (folder / "notes.txt").read_text() == "mine"
    ours = load_weights(folder, torch.float32, "cpu").eval()
    torch.testing.assert_close(logits(ours), expected, atol=2e-5, rtol=1e-5)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    torch.testing.assert_close(logits(theirs), expected, atol=2e-5, rtol=1e-5)
    marker = json.loads((folder / MARKER).read_text())
    assert "notes.txt" not in marker["files"] and "model.safetensors" in marker["files"]


def test_merged_after_lora_export_leaves_no_adapter_to_shadow_it(tok, tmp_path):
    """velotune's loader prefers adapter_config.json: a stale adapter would replace the merged model."""
    model = lora(tiny.model("llama"))
    folder = tmp_path / "out"
    save_pretrained_merged(model, folder, tok, save_method="lora")
    save_pretrained_merged(model, folder, tok)
    assert not list(folder.glob("adapter_*"))


def test_gguf_exports_of_several_methods_accumulate(tok, tmp_path):
    """The docs export q4_k_m, then q8_0, then f16 into one folder: all three stay."""
    model = tiny.model("llama")
    for method in ("q8_0", "f16"):
        save_pretrained_gguf(model, tmp_path / "dir", tok, quantization_method=method, verify=False)
    assert {"model-Q8_0.gguf", "model-F16.gguf"} <= {p.name for p in (tmp_path / "dir").iterdir()}


_CRASH = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from tiny import export_shapes as tiny
    from velotune.export import merged, save_pretrained_merged, save_pretrained_gguf
    import velotune.export.gguf_writer as gguf_writer
    kind = sys.argv[1]
    if kind == "merged":
        real = merged.save_file
        def dying_save(tensors, path, metadata=None):  # the shard is written, then the process dies
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), 9)
        merged.save_file = dying_save
        save_pretrained_merged(tiny.model("llama"), {folder!r}, tiny.tokenizer(), max_shard_size="600KB")
    else:
        real_write = gguf_writer._write_tensors
        def dying_write(*args):
            os.kill(os.getpid(), 9)
        gguf_writer._write_tensors = dying_write
        save_pretrained_gguf(tiny.model("llama"), {folder!r}, tiny.tokenizer(), quantization_method="q8_0")
""")


@pytest.mark.parametrize("kind", ["merged", "gguf"])
def test_a_crashed_export_is_recovered_by_the_next_one(kind, tok, tmp_path):
    folder = tmp_path / "out"
    script = _CRASH.format(tests=str(Path(__file__).parents[1]), folder=str(folder))
    run = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True)
    assert run.returncode == -9, run.stderr[-2000:]
    assert list(folder.glob("*.partial")), sorted(p.name for p in folder.iterdir())
    model = tiny.model("llama")
    if kind == "merged":
        save_pretrained_merged(model, folder, tok)
    else:
        save_pretrained_gguf(model, folder, tok, quantization_method="q8_0")
    assert not list(folder.glob("*.partial"))


def test_partials_of_an_unmarked_crashed_export_are_ours_to_remove(tok, tmp_path):
    """A folder holding only our own half-files (a crash before markers came first) is not refused."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model-00001-of-00003.safetensors.partial").write_bytes(b"half")
    save_pretrained_merged(tiny.model("llama"), folder, tok, verify=False)
    assert not list(folder.glob("*.partial"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "draft.partial").write_text("the user's")  # not a name velotune writes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained_merged(tiny.model("llama"), tmp_path / "user", tok, verify=False)
    assert (tmp_path / "user" / "draft.partial").read_text() == "the user's"


_LIMITED = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {tests!r})
    from tiny import export_shapes as tiny
    from velotune.export import save_pretrained_merged, save_pretrained_gguf
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    model, tok = tiny.model("llama"), tiny.tokenizer()
    if sys.argv[1] == "merged":
        save_pretrained_merged(model, {folder!r}, tok, verify=False)
    else:
        save_pretrained_gguf(model, {folder!r}, tok, quantization_method="f16", verify=False)
""")


@pytest.mark.parametrize("kind, file", [("merged", "model.safetensors"), ("gguf", "model-F16.gguf")])
def test_file_size_limit_names_the_file(kind, file, tmp_path):
    folder = tmp_path / "out"
    script = _LIMITED.format(tests=str(Path(__file__).parents[1]), folder=str(folder))
    run = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert str(folder / file) in last and "file-size limit" in last and "ulimit -f" in last, last
    assert not list(folder.glob("*.partial"))
