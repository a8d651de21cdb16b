"""GRPO's sampling: the engine and the transformers fallback give the same greedy completions, and the
fallback's shared prefill (one per prompt, cache repeated per sample) equals plain generate."""

from __future__ import annotations

import torch

from tiny.folders import tiny_lora
from velotune.rl.generation import Sampler, Sampling, left_pad, stop_ids, transformers_sample


def prompts_of(tokenizer):
    return [tokenizer("hello world")["input_ids"], tokenizer("ab")["input_ids"], tokenizer("x y z w")["input_ids"]]


def test_shared_prefill_equals_plain_generate(tiny_llama_dir):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    model.eval()
    prompts = prompts_of(tokenizer)
    with torch.no_grad():
        shared = transformers_sample(model, tokenizer, prompts, Sampling(n=2, max_tokens=8, temperature=0))
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
        plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                               eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    stops = set(stop_ids(model, tokenizer))
    for p, group in enumerate(shared):
        row = plain[p, ids.shape[1]:].tolist()
        end = next((k for k, t in enumerate(row) if t in stops), len(row) - 1)
        assert [c.token_ids for c in group] == [row[:end + 1]] * 2
        assert all(c.finished == (row[end] in stops) for c in group)


def test_engine_and_fallback_agree(tiny_llama_dir):
    model, tokenizer = tiny_lora(tiny_llama_dir)
    prompts = prompts_of(tokenizer)
    sampling = Sampling(n=2, max_tokens=6, temperature=0)
    engine = Sampler("auto")
    fast = engine(model, tokenizer, prompts, sampling)
    assert engine.last_engine == "velotune"
    fallback = Sampler("transformers")
    slow = fallback(model, tokenizer, prompts, sampling)
    assert fallback.last_engine == "transformers"
    assert [[(c.token_ids, c.finished) for c in g] for g in fast] == [[(c.token_ids, c.finished) for c in g]
                                                                      for g in slow]
    assert model.training  # the sampler restores the mode it found


def test_a_large_kv_cache_is_given_back_before_training(tiny_llama_dir):
    """The engine keeps its cache (and graphs) for the next generation while it is small next to the weights;
    above keep_cache_fraction of the weight bytes it is released before the training step, and the next
    generation allocates it again with the same completions."""
    from velotune.inference import resident_of

    model, tokenizer = tiny_lora(tiny_llama_dir)
    prompts = prompts_of(tokenizer)
    sampling = Sampling(n=2, max_tokens=6, temperature=0)
    keeping = Sampler("velotune", keep_cache_fraction=float("inf"))  # the tiny model's cache outweighs its weights
    kept = keeping(model, tokenizer, prompts, sampling)
    assert resident_of(model) is not None and keeping.released == 0
    releasing = Sampler("velotune", keep_cache_fraction=0.0)
    again = releasing(model, tokenizer, prompts, sampling)
    assert resident_of(model) is None and releasing.released == 1
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in kept]
