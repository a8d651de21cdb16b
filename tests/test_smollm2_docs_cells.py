"""The Unsloth notebooks' inference cell on the real SmolLM2 and its real tokenizer (transformers 5
returns a BatchEncoding from apply_chat_template, which the cell passes as `input_ids=`)."""

from __future__ import annotations

import pytest
import torch
from transformers import TextStreamer

from velotune import FastLanguageModel


@pytest.mark.slow
def test_docs_inference_cell_answers_paris(smollm2, capsys):
    model, tokenizer = smollm2
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt").to(model.device)
    assert not isinstance(inputs, torch.Tensor)  # what broke the cell: a BatchEncoding, not a tensor
    text_streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(input_ids=inputs, streamer=text_streamer, max_new_tokens=12, use_cache=True,
                         do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert "Paris" in capsys.readouterr().out
    # The cell as written (temperature=1.5, min_p=0.1 sample) runs too.
    torch.manual_seed(0)
    sampled = model.generate(input_ids=inputs, max_new_tokens=4, use_cache=True, temperature=1.5, min_p=0.1,
                             do_sample=True)
    assert sampled.shape[1] > inputs["input_ids"].shape[1]
