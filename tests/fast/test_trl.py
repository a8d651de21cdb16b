"""TRL's SFTTrainer on the fast path: it trains, logs its token accuracy, and its losses equal
the plain path's (fp32; fast path forced on the CPU, automatic on CUDA).

TRL 1.x computes the loss in its own fused LM head (`model(**inputs, fused_lm_head=True)`), a
Triton kernel it launches whatever the tensors' device: on a CPU machine it runs under the
interpreter (tests/conftest.py turns it on before triton is imported); on a CUDA machine triton
is compiled, so CPU tensors would reach a compiled kernel ("Pointer argument ... cpu tensor?").
There the test trains on CUDA."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny.lora import lora_model
from tiny.families import VOCAB
from velotune.fast.plan import set_fast_path


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _train(fast: bool, tmp_path) -> tuple[list[dict], int]:
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    model = lora_model("llama", device="cuda" if on_cuda else "cpu")
    set_fast_path(model, fast)
    module_calls = []  # the plain path calls the q_proj module; the fused path reads its weights
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: module_calls.append(1))
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (int(n),), generator=gen))
             for n in torch.randint(6, 14, (8,), generator=gen)]
    args = SFTConfig(output_dir=str(tmp_path / str(fast)), max_steps=3, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=not on_cuda, bf16=False, fp16=False,
                     save_strategy="no", max_length=32, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=_tokenizer())
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log], len(module_calls)


def test_sft_trainer_fast_equals_plain(tmp_path, monkeypatch):
    if torch.cuda.is_available():  # fp32 means fp32 (TF32 would make the two paths round differently)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    (fast, fast_calls), (plain, plain_calls) = _train(True, tmp_path), _train(False, tmp_path)
    assert fast_calls == 0 and plain_calls > 0
    assert len(fast) == len(plain) == 3
    for f, p in zip(fast, plain):
        assert abs(f["loss"] - p["loss"]) <= 1e-4 * abs(p["loss"]), (f, p)
        assert abs(f["mean_token_accuracy"] - p["mean_token_accuracy"]) <= 1e-6
