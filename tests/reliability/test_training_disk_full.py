"""Issue 14, "Disk full / file-size limit" on the training side: a checkpoint save, the final
save_model and PEFT's own `model.save_pretrained(dir)` that run out of room name the file being
written (and, in training, the last good checkpoint), leave no half-written checkpoint behind, and
the run resumes from that checkpoint once there is room.

The limit is the process's RLIMIT_FSIZE (as `ulimit -f` sets it), set in a subprocess by a callback
after the first checkpoint, so there is a good checkpoint before the failing one. Python ignores
SIGXFSZ, so the writes fail with EFBIG (torch reports it as "unexpected pos", safetensors as
"FileTooLarge"). One subprocess runs every case (imports cost ~10 s of CPU each)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny.folders import tiny_folder

_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from transformers import TrainerCallback
    from training.helpers import quiet_args, text_dataset
    from tiny.folders import tiny_lora
    from velotune.training import SFTTrainer, TrainingArguments

    root, hard = Path({root!r}), resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    class LimitAfterFirstSave(TrainerCallback):  # checkpoint-1 is whole; checkpoint-2's optimizer.pt (89 KB) fails
        def on_save(self, args, state, control, **kwargs):
            limit(50_000)

    def error_of(call):
        try:
            call()
        except OSError as error:
            return {{"type": type(error).__name__, "errno": error.errno, "message": str(error)}}
        finally:
            limit(hard)
        return None

    model, tokenizer = tiny_lora(Path({tiny!r}))
    args = TrainingArguments(**quiet_args(root / "out", max_steps=3, save_strategy="steps", save_steps=1))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(16, seed=2), args=args)
    trainer.add_callback(LimitAfterFirstSave())
    result = {{"checkpoint": error_of(trainer.train)}}
    result["after_failure"] = sorted(str(p.relative_to(root / "out")) for p in (root / "out").rglob("*"))
    trainer.remove_callback(LimitAfterFirstSave)
    trainer.train(resume_from_checkpoint=True)  # room again: the run continues from checkpoint-1
    result["resumed_to"] = trainer.state.global_step
    limit(20_000)  # adapter_model.safetensors is 36 KB
    result["save_model"] = error_of(trainer.save_model)
    limit(20_000)
    result["peft"] = error_of(lambda: trainer.model.save_pretrained(root / "adapter"))
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full")
    tiny = tiny_folder(root)
    script = _SCRIPT.format(tests=str(Path(__file__).parents[1]), root=str(root), tiny=str(tiny))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return root / "out", json.loads(line[len("RESULT "):])


def test_a_checkpoint_save_that_hits_the_limit_names_the_file_and_the_last_good_checkpoint(outcome):
    out, result = outcome
    error = result["checkpoint"]
    assert error is not None, "the checkpoint save did not fail"
    assert error["errno"] == 27  # EFBIG
    message = error["message"]
    assert "/checkpoint-2/optimizer.pt failed after" in message and "file-size limit" in message, message
    assert "ulimit -f" in message and f"the last good checkpoint is {out / 'checkpoint-1'}" in message, message
    assert "resume_from_checkpoint=True" in message, message


def test_a_failed_checkpoint_leaves_the_last_good_one_and_no_half_written_folder(outcome):
    _, result = outcome
    after = result["after_failure"]
    assert "checkpoint-1/optimizer.pt" in after and "checkpoint-1/adapter_model.safetensors" in after
    assert not [p for p in after if p.startswith("checkpoint-2") or p.startswith(".partial")], after
    assert result["resumed_to"] == 3


def test_the_final_save_model_names_the_file_and_the_last_checkpoint(outcome):
    out, result = outcome
    message = result["save_model"]["message"]
    assert f"writing {out / 'adapter_model.safetensors'} failed after" in message, message
    assert f"the last good checkpoint is {out / 'checkpoint-3'}" in message, message


def test_peft_save_pretrained_that_hits_the_limit_names_the_file(outcome):
    out, result = outcome
    message = result["peft"]["message"]
    assert result["peft"]["errno"] == 27
    assert f"writing {out.parent / 'adapter' / 'adapter_model.safetensors'} failed after" in message, message
    assert "file-size limit" in message and "incomplete" in message, message
