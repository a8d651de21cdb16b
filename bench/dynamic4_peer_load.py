"""Does Unsloth load a dynamic 4-bit folder velotune wrote? (issue 18 item 4; GPU machine, peers in .peers)

Step 1 (this process, velotune only): a SmolLM2-shaped random Llama folder, then `quantize_dynamic` into OUT/dyn.
Step 2 (a fresh process, since importing Unsloth patches transformers): Unsloth's FastLanguageModel loads OUT/dyn;
the kept layers must be plain 16-bit Linear, every other candidate bitsandbytes 4-bit, and its logits must match
velotune's on the same ids. Prints one RESULT line of JSON.

  PYTHONPATH=src:.peers:tests python bench/dynamic4_peer_load.py /tmp/dyn4
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
IDS = [[5, 17, 30, 41, 2, 60, 12, 33, 70, 8, 9, 44]]


def write(out: Path) -> dict:
    import torch
    from tiny.export_shapes import VOCAB, tokenizer
    from tiny.folders import tiny_llama_config
    from transformers import LlamaForCausalLM

    from velotune import FastLanguageModel
    from velotune.quantize import quantize_dynamic

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**SHAPE, vocab_size=VOCAB)).save_pretrained(out / "base")
    tokenizer().save_pretrained(out / "base")
    report = quantize_dynamic(str(out / "base"), out / "dyn", max_tokens=2048, seq_len=256)
    model, _ = FastLanguageModel.from_pretrained(str(out / "dyn"), load_in_4bit=True, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor(IDS, device="cuda")).logits.float().cpu()
    torch.save(logits, out / "velotune_logits.pt")
    return {"kept": report.kept, "candidates": [c.name for c in report.candidates], "summary": report.summary()}


def load_in_unsloth(out: Path) -> dict:
    import torch
    from unsloth import FastLanguageModel  # noqa: I001 (patches transformers: this process only)

    meta = json.loads((out / "meta.json").read_text())
    model, _ = FastLanguageModel.from_pretrained(str(out / "dyn"), max_seq_length=256, load_in_4bit=True,
                                                 dtype=torch.bfloat16)
    kinds = {name: type(model.get_submodule(name)).__name__ for name in meta["candidates"]}
    wrong = [n for n, kind in kinds.items() if (kind == "Linear4bit") == (n in meta["kept"])]
    with torch.no_grad():
        logits = model(torch.tensor(IDS, device="cuda")).logits.float().cpu()
    ours = torch.load(out / "velotune_logits.pt")
    diff = float((logits.softmax(-1) - ours.softmax(-1)).abs().max())
    return {"unsloth_loaded": True, "wrong_kind": wrong, "kept_kinds": sorted({kinds[n] for n in meta["kept"]}),
            "max_prob_diff_vs_velotune": diff, "ok": not wrong and diff < 2e-2}


def main() -> None:
    out = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--unsloth":
        print("RESULT " + json.dumps(load_in_unsloth(out)), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    meta = write(out)
    (out / "meta.json").write_text(json.dumps(meta))
    print("WRITTEN " + meta["summary"], flush=True)
    done = subprocess.run([sys.executable, __file__, str(out), "--unsloth"], capture_output=True, text=True)
    sys.stdout.write(done.stdout[-4000:])
    sys.stderr.write(done.stderr[-8000:])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
