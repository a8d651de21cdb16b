"""The DDP tests' tiny model: a seeded random transformers Llama with a character tokenizer, on disk.

Written here (not imported from the other suites' helpers) because the worker processes load it by path."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process reference runs are tiny and host-bound: one thread (as the workers use)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
