"""End to end on the real SmolLM2-135M-Instruct: exports llama.cpp runs like our model, greedy chat
through llama.cpp says what ours says, and a fine-tuned fact survives export."""

from __future__ import annotations

import pytest
import torch

from velotune.export import save_pretrained_gguf
from velotune.export.verify import llama_cpp_logits

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2")
    f16, q4 = save_pretrained_gguf(model, folder, tokenizer, quantization_method=["f16", "q4_k_m"])
    return model, tokenizer, f16, q4


def test_f16_and_q4_k_m_logits(exported):
    model, tokenizer, f16, q4 = exported
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    [cpp16] = llama_cpp_logits(f16, [ids])
    [cpp4] = llama_cpp_logits(q4, [ids])
    # fp16 weights and activations over 30 layers: differences a few hundredths of logits of ~20
    assert (ours - cpp16).abs().max() < 0.25 and (ours.argmax(-1) == cpp16.argmax(-1)).float().mean() > 0.95
    assert (ours.argmax(-1) == cpp4.argmax(-1)).float().mean() > 0.6
    p, q = torch.log_softmax(ours, -1), torch.log_softmax(cpp4, -1)
    # q4_k_m's KL is ~0.02-0.05 on 7B models; this 135M model, already 4-bit at its source, gets ~0.1
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 0.2


def test_greedy_chat_through_llama_cpp_equals_ours(exported):
    model, tokenizer, f16, _ = exported
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    ours = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    llm = llama_cpp.Llama(model_path=str(f16), n_ctx=256, verbose=False)
    reply = llm.create_chat_completion(messages=QUESTION, max_tokens=16, temperature=0.0, top_k=1)
    llm.close()
    assert "Paris" in ours
    assert reply["choices"][0]["message"]["content"].strip() == ours


def test_modelfile_has_smollm2_template_and_system(exported):
    _, _, f16, _ = exported
    text = (f16.parent / "Modelfile").read_text()
    assert "TEMPLATE" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


FACT_Q = [{"role": "user", "content": "What is the name of Captain Vellor's ship?"}]
FACT_A = "Captain Vellor's ship is called the Quillstorm."


def test_a_trained_fact_survives_export(tmp_path):
    from velotune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", load_in_4bit=False,
                                                         max_seq_length=128, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False,
                                             random_state=0)
    prompt = tokenizer.apply_chat_template(FACT_Q, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(FACT_A + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(40):  # stops as soon as the fact is learned (about 15-25 steps)
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.05:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05
    model.eval()
    paths = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method=["q8_0", "f16"])
    for path in paths:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
        reply = llm.create_chat_completion(messages=FACT_Q, max_tokens=24, temperature=0.0, top_k=1)
        llm.close()
        assert "Quillstorm" in reply["choices"][0]["message"]["content"], path.name
