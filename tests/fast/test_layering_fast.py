"""The fast path and the kernels load without the models package (issue 15: `fast/` and
`kernels/` sit below `models/`; the plan recognises our decoder by its base class)."""

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")  # this checkout's package, not an installed one

# `velotune/__init__.py` loads the whole API; the package object is made by hand here so that only
# the modules named below (and what they import) run, and any import of models/ or lora/ fails.
CODE = """
import importlib.abc, sys, types, torch
package = types.ModuleType("velotune")
package.__path__ = [SRC + "/velotune"]
sys.modules["velotune"] = package

class Above(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("velotune.models", "velotune.lora", "velotune.fast_language_model", "velotune.training")):
            raise ImportError(f"{name} is above fast/ and kernels/")

sys.meta_path.insert(0, Above())
import velotune.kernels, velotune.fast.plan, velotune.fast.lora_linear, velotune.fast.lora_mlp
q = torch.randn(1, 2, 3, 4)
cos, sin = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
assert torch.equal(velotune.kernels.apply_rope_reference(q, q, cos, sin)[0], q)
assert torch.equal(velotune.kernels.apply_rope(q, q, cos, sin)[0], q)
assert velotune.fast.plan.find_decoder(torch.nn.Linear(2, 2)) is None
print(sorted(m for m in sys.modules if m.startswith(("velotune.models", "velotune.lora"))))
"""


def test_fast_and_kernels_import_and_run_without_models():
    done = subprocess.run([sys.executable, "-c", f"SRC = {SRC!r}\n" + CODE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_our_decoder_is_found_through_its_base_class():
    from tiny.lora import lora_model

    from velotune.fast.plan import FastPathDecoder, find_decoder
    from velotune.models.decoder import DecoderModel

    model = lora_model("llama")
    decoder = find_decoder(model)
    assert isinstance(decoder, DecoderModel) and issubclass(DecoderModel, FastPathDecoder)
    assert find_decoder(decoder) is decoder
