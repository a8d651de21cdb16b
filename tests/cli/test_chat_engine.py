"""`velotune chat` answers on velotune's generation engine (issue 16: "the chat command uses the
engine"), and its answer is the one transformers' own greedy loop gives on the same weights."""

from __future__ import annotations

from transformers import GenerationMixin

from velotune import cli
from velotune.inference import engine

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def test_chat_answers_on_the_engine_as_transformers_would(smollm2, monkeypatch):
    runs = []
    real = engine.generate

    def counted(*args, **kwargs):  # the real engine, counted
        runs.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", counted)
    answer = cli.chat(SMOLLM2, prompt=QUESTION, max_new_tokens=8)
    assert runs == [1], "chat did not run on the engine"

    model, tokenizer = smollm2  # the same weights, fp32 on the CPU; transformers' generate loop
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = GenerationMixin.generate(model, **inputs, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == expected and answer.strip()
