"""The engine's loop for causal LMs that are not velotune decoders (the generic transformers path).

Same sampling, stopping and outputs as the engine, over the model's own forward and
transformers' DynamicCache: no static cache, no graphs, no shared prefill (each sample is its
own row) and finished rows keep running until the batch ends. Slower, but `fast_generate`
answers for every model `from_pretrained` loads.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ..device import model_device
from .sampling import SamplingParams, chosen_logprobs, sample


def generate(model, prompts, params: SamplingParams, eos_ids: set[int], tokenizer=None, on_token=None,
             limit: int | None = None):
    from .engine import (Sequence, StopChecker, _before_min_tokens, base_model, check_prompts, context_limit,
                         eval_mode, note_sampled)

    causal = base_model(model)
    limit = limit or context_limit(causal)
    # a vision-language config keeps the vocabulary in its text config (Mllama: this loop, not the engine, serves it)
    prompts = check_prompts(prompts, params, limit, causal.config.get_text_config().vocab_size)
    n = params.n
    rows = [p for p in prompts for _ in range(n)]
    P = max(len(p) for p in rows)
    device = model_device(causal)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, prompt in enumerate(rows):
        ids[i, P - len(prompt):], mask[i, P - len(prompt):] = torch.tensor(prompt), 1
    ids, mask = ids.to(device), mask.to(device)
    seqs = [Sequence(i // n, i % n, min(params.max_tokens or limit, limit - len(p)),
                     logprobs=[] if params.logprobs is not None else None) for i, p in enumerate(rows)]
    stopper = StopChecker(params, eos_ids, tokenizer)
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    seen = counts = None
    with eval_mode(model), torch.no_grad():
        cache = DynamicCache(config=causal.config)
        # transformers 5.2x renamed past_key_values to cache (the old name is deprecated): pass the one it takes
        name = "cache" if "cache" in inspect.signature(causal.forward).parameters else "past_key_values"
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = causal(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{name: cache}).logits[:, -1].float()
        if params.needs_seen:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen.scatter_(1, ids, mask.bool())
        if params.needs_counts:
            counts = torch.zeros_like(logits, dtype=torch.int32)
        suppress = sorted(stopper.eos | stopper.stop_ids)
        step = 0
        while True:
            tokens = sample(_before_min_tokens(logits, params, step, suppress), params, generator, seen, counts)
            logps = chosen_logprobs(logits, tokens).tolist() if params.logprobs is not None else None
            for s, token in enumerate(tokens.tolist()):
                if seqs[s].finish_reason is None:
                    seqs[s].take(s, token, None if logps is None else logps[s], stopper, on_token)
            if all(seq.finish_reason is not None for seq in seqs):
                return seqs
            note_sampled(tokens, seen, counts)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = causal(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                            use_cache=True, **{name: cache}).logits[:, -1].float()
            step += 1
