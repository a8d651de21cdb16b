"""Greedy decoding on the engine equals transformers' `generate` token for token (issue 16, item 4).

Every tiny family, one prompt and a left-padded batch, without and with LoRA adapters (PEFT's
model on transformers' reference against our PEFT model on the engine, same adapter weights);
SmolLM2 on one real prompt. The engine is reached through `hf_generate`, the contract
`FastLanguageModel.for_inference` routes `model.generate` to, and through `generate_batch`.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model as peft_get_peft_model

from tiny.families import FAMILIES, PAD_ID, STATEFUL_ROPE, VOCAB, make_config, make_hf
from velotune.inference import SamplingParams, generate_batch, hf_generate
from velotune.lora import get_peft_model
from velotune.models import model_class_for

GEN = dict(do_sample=False, max_new_tokens=10, pad_token_id=PAD_ID, eos_token_id=None)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    a, b = _tokens(9, 6), _tokens(5, 7)
    ids = torch.full((2, 9), PAD_ID)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1
    return ids, mask


def _pair(family: str, lora: bool):
    """(transformers reference, ours) with the same weights; with LoRA: the same non-zero adapters."""
    hf = make_hf(family, attn="eager")
    cfg = make_config(family)
    ours = model_class_for(cfg)(cfg)
    ours.load_state_dict(hf.state_dict())
    ours.eval()
    ours.max_seq_length = 64  # as from_pretrained sets it (tiny configs' max_position_embeddings can be 8)
    if not lora:
        return hf, ours
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf = peft_get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours = get_peft_model(ours, r=4, lora_alpha=8, target_modules=targets, use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        ours.load_state_dict(hf.state_dict(), strict=False)
    return hf.eval(), ours.train()  # train mode: the engine must still decode without dropout


# With adapters: one family per knob that touches the adapted projections (plain, q/k/v biases,
# q/k norms, soft-capping + sliding windows, per-layer-type rope + sliding layers); phi3's fused
# checkpoint names differ from ours, so PEFT adapters do not interchange with transformers' by name.
LORA_FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"]
CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in LORA_FAMILIES]


@pytest.mark.parametrize("family, lora", CASES, ids=[f"{f}-{'lora' if lora else 'base'}" for f, lora in CASES])
def test_greedy_equals_transformers(family, lora):
    hf, ours = _pair(family, lora)
    prompt = _tokens(7, 6)[None]
    with torch.no_grad():
        ref = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **GEN)
        got = hf_generate(ours, prompt, attention_mask=torch.ones_like(prompt), **GEN)
        assert got.tolist() == ref.tolist(), f"{family} one prompt: engine {got.tolist()} vs transformers {ref.tolist()}"
        ids, mask = _left_padded()
        if family in STATEFUL_ROPE:  # transformers' dynamic rope keeps state between calls: a fresh reference
            hf, _ = _pair(family, lora)
        ref = hf.generate(input_ids=ids, attention_mask=mask, **GEN)
        got = hf_generate(ours, ids, attention_mask=mask, **GEN)
        assert got.tolist() == ref.tolist(), f"{family} left-padded: engine {got.tolist()} vs transformers {ref.tolist()}"
    # generate_batch (token lists, no padding given) returns the same new tokens
    prompts = [_tokens(9, 6).tolist(), _tokens(5, 7).tolist()]
    out = generate_batch(ours, prompts, SamplingParams(temperature=0, max_tokens=10))
    assert [o.outputs[0].token_ids for o in out] == [row[9:].tolist() for row in got]
    assert all(o.outputs[0].finish_reason == "length" for o in out)


def test_eos_stops_each_sequence_and_pads():
    """With an EOS id, each row stops at its own EOS; transformers pads the finished rows."""
    hf, ours = _pair("llama", False)
    ids, mask = _left_padded()
    free = hf.generate(input_ids=ids, attention_mask=mask, **GEN)
    eos = int(free[1, 9 + 2])  # the third token of row 1 becomes "EOS"
    gen = dict(GEN, eos_token_id=eos)
    ref = hf.generate(input_ids=ids, attention_mask=mask, **gen)
    got = hf_generate(ours, ids, attention_mask=mask, **gen)
    assert got.tolist() == ref.tolist()
    out = generate_batch(ours, [_tokens(9, 6).tolist(), _tokens(5, 7).tolist()],
                         SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[eos]))
    assert out[1].outputs[0].finish_reason == "stop" and out[1].outputs[0].token_ids[-1] == eos
    assert len(out[1].outputs[0].token_ids) <= 3


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2, smollm2_folder):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = dict(do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        ref = ref_model.generate(**ids, **gen)
        got = hf_generate(model, ids["input_ids"], attention_mask=ids["attention_mask"], **gen)
    assert got.tolist() == ref.tolist()
    assert "Paris" in tokenizer.decode(got[0, ids["input_ids"].shape[1]:])


def test_generic_path_model_equals_transformers():
    """A model velotune does not implement (transformers' own class) runs the engine's generic loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    ids, mask = _left_padded()
    ref = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    out = generate_batch(model, [_tokens(9, 6).tolist(), _tokens(5, 7).tolist()],
                         SamplingParams(temperature=0, max_tokens=10))
    assert [o.outputs[0].token_ids for o in out] == [row[9:].tolist() for row in ref]
