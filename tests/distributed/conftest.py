"""The DDP tests' tiny model: a seeded random transformers Llama with a character tokenizer, on disk.

Written here (not imported from the other suites' helpers) because the worker processes load it by path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96


def write_tiny_llama(folder) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 32 + VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


@pytest.fixture(scope="session")
def ddp_tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp-model") / "tiny-llama"
    write_tiny_llama(folder)
    return folder


def launch_fsdp_trainer_worker(*worker_args, nproc: int | None) -> None:
    """fsdp_trainer_worker.py under `torchrun --standalone` (gloo, no GPU) or as one plain process (nproc None),
    without TRITON_INTERPRET: the fast path's autograd functions are under test there, not the kernels."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(here.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    done = subprocess.run([sys.executable, *launcher, str(here / "fsdp_trainer_worker.py"), *map(str, worker_args)],
                          env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="session")
def fsdp_runs(ddp_tiny_dir, tmp_path_factory):
    """One torchrun launch (2 ranks) and one plain process serve test_fsdp2_trainer.py and test_fsdp2.py: each
    launch costs two shared cores 10-15 s of imports, so fsdp2_worker.py's job runs first in the same processes
    (--fsdp2-out). Returns (sharded trainer runs, one-process trainer runs, fsdp2 results folder)."""
    sharded, one = tmp_path_factory.mktemp("fsdp2-trainer"), tmp_path_factory.mktemp("fsdp2-one")
    fsdp2 = tmp_path_factory.mktemp("fsdp2")
    launch_fsdp_trainer_worker("--folder", ddp_tiny_dir, "--out", sharded, "--fsdp2-out", fsdp2, nproc=2)
    launch_fsdp_trainer_worker("--folder", ddp_tiny_dir, "--out", one, "--references", sharded,
                               "--fsdp2-out", fsdp2, nproc=None)
    return sharded, one, fsdp2


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process reference runs are tiny and host-bound: one thread (as the workers use)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
