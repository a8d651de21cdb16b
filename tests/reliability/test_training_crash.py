"""Crash consistency (issue 14, "Also"): a real training process with save_steps=1 is killed with SIGKILL at
seeded random moments (at least 10 kills, some while a checkpoint is being written) and resumed each time.
Every folder that looks like a checkpoint must load, and the resumed chain must end with the adapter of the
uninterrupted run.

Speed: importing torch/transformers/TRL costs seconds per process, so one server process imports them once
and forks a child per run; the children are the processes that train and get killed (the server reaps each
one, so its pid is really gone, as after a crash on a user's machine).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from velotune.training.checkpoints import MARKER
from velotune.training.run_lock import LOCK_NAME

from tiny.folders import tiny_folder

STEPS = 16
KILLS = 10
SEED = 1234

SERVER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from velotune.training import LossPlotCallback, SFTTrainer, TrainingArguments
    from training.helpers import quiet_args, text_dataset
    from tiny.folders import tiny_lora

    def say(line):
        os.write(1, (line + "\\n").encode())

    class Events(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            say(f"step {state.global_step + 1}")

    class Trainer(SFTTrainer):
        def _save_checkpoint(self, model, trial):
            say(f"save-begin {self.state.global_step}")
            super()._save_checkpoint(model, trial)
            say(f"save-end {self.state.global_step}")

    def run(output_dir, resume):
        model, tokenizer = tiny_lora(sys.argv[1])
        args = TrainingArguments(**quiet_args(output_dir, max_steps=STEPS, save_strategy="steps", save_steps=1,
                                              logging_steps=1))
        trainer = Trainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(48, seed=7),
                          args=args, callbacks=[Events()])
        trainer.remove_callback(LossPlotCallback)  # matplotlib's import would be most of a short run
        trainer.train(resume_from_checkpoint=True if resume else None)
        say("done")

    say("ready")
    for command in sys.stdin:
        output_dir, resume = command.split()
        pid = os.fork()
        if pid == 0:
            try:
                run(output_dir, resume == "1")
                code = 0
            except BaseException as exc:
                say(f"error {type(exc).__name__}: {exc}")
                code = 1
            os._exit(code)
        say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {status}")
''').replace("STEPS", str(STEPS))


class Server:
    def __init__(self, tiny_llama_dir: Path):
        tests = Path(__file__).resolve().parents[1]
        path = os.pathsep.join([str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tiny_llama_dir), str(tests)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.line() == "ready"

    def line(self) -> str:
        line = self.proc.stdout.readline()
        assert line, "the training server died"
        return line.strip()

    def start(self, output_dir: Path, resume: bool) -> int:
        self.proc.stdin.write(f"{output_dir} {int(resume)}\n")
        self.proc.stdin.flush()
        first = self.line()
        assert first.startswith("child "), first
        return int(first.split()[1])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _run_to_end(server: Server, output_dir: Path, resume: bool) -> list[str]:
    server.start(output_dir, resume)
    events = []
    while not (line := server.line()).startswith("exit "):
        events.append(line)
    assert line == "exit 0" and events[-1] == "done", events[-5:]
    return events


def _check_checkpoints(output_dir: Path) -> list[int]:
    """Every folder named like a checkpoint is complete and loads."""
    steps = []
    for folder in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(folder.name.split("-")[1])
        assert (folder / MARKER).is_file(), folder
        assert load_file(str(folder / "adapter_model.safetensors")), folder
        torch.load(folder / "optimizer.pt", weights_only=False)
        torch.load(folder / "scheduler.pt", weights_only=False)
        torch.load(folder / "rng_state.pth", weights_only=False)
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        steps.append(step)
    return steps


def test_kill_minus_nine_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    tiny_llama_dir = tiny_folder(tmp_path)
    server = Server(tiny_llama_dir)
    try:
        _run_to_end(server, tmp_path / "straight", resume=False)

        chain = tmp_path / "chain"
        rng = random.Random(SEED)
        kills, during_save, runs = 0, 0, 0
        while True:
            runs += 1
            assert runs <= 3 * KILLS, "the chain does not progress"
            resume = any(chain.glob("checkpoint-*"))
            child = server.start(chain, resume)
            if kills >= KILLS:  # enough crashes: let it finish
                while not (line := server.line()).startswith("exit "):
                    pass
                assert line == "exit 0"
                break
            on_save = rng.random() < 0.6
            event, nth = ("save-begin" if on_save else "step"), rng.randint(1, 2)
            delay = rng.uniform(0, 0.02) if on_save else rng.uniform(0, 0.15)
            seen, killed, saving, lines = 0, False, None, []
            while not (line := server.line()).startswith("exit "):
                lines.append(line)
                kind = line.split()[0]
                if kind == "save-begin":
                    saving = line.split()[1]
                elif kind == "save-end":
                    saving = None
                if not killed and kind == event:
                    seen += 1
                    if seen == nth:
                        time.sleep(delay)
                        os.kill(child, signal.SIGKILL)
                        killed = True
            if line == f"exit {signal.SIGKILL}":
                # The dead run's lock stays behind naming it; the next run must take it over (stale pid).
                assert json.loads((chain / LOCK_NAME).read_text())["pid"] == child
                kills += 1
                during_save += saving is not None  # a save had begun and had not ended when it died
            else:
                assert line == "exit 0", lines[-5:]
                break  # finished before the kill landed
            _check_checkpoints(chain)
        assert kills >= KILLS, f"only {kills} kills before the run finished"
        assert during_save >= 2, f"only {during_save} of {kills} kills landed during a save"
    finally:
        server.close()

    assert _check_checkpoints(chain)[-1] == STEPS
    assert not (chain / LOCK_NAME).exists() and not (chain / ".partial").exists()
    expected = load_file(str(tmp_path / "straight" / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    resumed = load_file(str(chain / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
