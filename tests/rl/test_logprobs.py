"""GRPO's log-probabilities (backbone hidden states -> chunked log-probs, no full logits) equal the model's own
logits' log-softmax on a left-padded prompt + right-padded completion batch, at a temperature, and in backward."""

from __future__ import annotations

import torch

from tiny.folders import tiny_lora
from velotune.rl.generation import left_pad
from velotune.rl.logprobs import causal_lm_parts, completion_logprobs


def batch(tokenizer):
    prompts = [tokenizer("hello world")["input_ids"], tokenizer("ab")["input_ids"]]
    completions = [[5, 6, 7, 2], [8, 9]]
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad, "cpu")
    completion_ids = torch.full((2, 4), pad)
    completion_mask = torch.zeros(2, 4, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)] = torch.tensor(c)
        completion_mask[i, :len(c)] = 1
    return (torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_mask)


def test_chunked_logprobs_equal_the_models_logits(tiny_llama_dir):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    with torch.no_grad():  # give the adapters a non-zero B, so they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask, cmask = batch(tokenizer)
    backbone, head = causal_lm_parts(model)
    assert backbone is not None and head is not None  # the chunked path, not the fallback
    logps, entropy = completion_logprobs(model, ids, mask, 4, temperature=0.7, entropy=True)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float() / 0.7  # (2, 4, V)
    reference = logits.log_softmax(-1).gather(-1, ids[:, -4:].unsqueeze(-1)).squeeze(-1)
    keep = cmask.bool()
    torch.testing.assert_close(logps[keep], reference[keep], rtol=1e-5, atol=1e-5)
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy[keep], -(probs * logits.log_softmax(-1)).sum(-1)[keep], rtol=1e-5,
                               atol=1e-5)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    ours = torch.autograd.grad((logps * cmask).sum(), adapters)
    theirs = torch.autograd.grad((reference * cmask).sum(), adapters)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_on_lm_head_uses_the_models_own_logits(tiny_llama_dir):
    model, tokenizer = tiny_lora(tiny_llama_dir, target_modules=["q_proj", "v_proj", "lm_head"])
    assert causal_lm_parts(model) == (None, None)  # the head is a LoRA layer: its weight alone is not the head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask, cmask = batch(tokenizer)
    logps, _ = completion_logprobs(model, ids, mask, 4)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float()
    reference = logits.log_softmax(-1).gather(-1, ids[:, -4:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps[cmask.bool()], reference[cmask.bool()], rtol=1e-5, atol=1e-5)


def test_entropy_in_chunks_of_a_few_tokens_equals_the_full_softmax(monkeypatch):
    """Chunks of 3 tokens (a byte budget of 3 fp32 logit rows) over 2 x 5 tokens: the last chunk is partial."""
    from velotune.rl import logprobs

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 16, generator=g), torch.randn(50, 16, generator=g)
    monkeypatch.setattr(logprobs, "ENTROPY_CHUNK_BYTES", 3 * 4 * 50)
    entropy = logprobs.chunked_entropy(hidden, weight, temperature=0.7)
    logp = ((hidden @ weight.t()) / 0.7).log_softmax(-1)  # (2, 5, 50)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)


def test_right_padded_rows_run_without_the_mask_and_give_the_same_log_probs(tiny_llama_dir):
    """One prompt's completions (no left padding, completions of different lengths): the backbone runs without
    the mask (causal kernels), and the real tokens' log-probs and gradients equal the masked model's."""
    from velotune.rl.logprobs import only_right_padding

    model, tokenizer = tiny_lora(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompt = tokenizer("hello world")["input_ids"]
    completions = [[5, 6, 7, 2], [8, 9], [10]]
    ids = torch.full((3, len(prompt) + 4), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(completions):
        row = prompt + c
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    cmask = mask[:, -4:]
    assert only_right_padding(mask) and not only_right_padding(mask.flip(1))
    logps, _ = completion_logprobs(model, ids, mask, 4)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float()  # (3, 4, V)
    reference = logits.log_softmax(-1).gather(-1, ids[:, -4:].unsqueeze(-1)).squeeze(-1)
    keep = cmask.bool()
    torch.testing.assert_close(logps[keep], reference[keep], rtol=1e-5, atol=1e-5)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    ours = torch.autograd.grad((logps * cmask).sum(), adapters)
    theirs = torch.autograd.grad((reference * cmask).sum(), adapters)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
