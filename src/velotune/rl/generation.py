"""All of GRPO's sampling behind one function: velotune's engine when it is there, transformers' otherwise.

`sample_completions` takes the unique prompts of a generation batch (token ids) and returns
num_generations completions of each. The engine (`velotune.inference.generate_batch`) runs the model
being trained, adapters included (colocated: no second copy, no weight sync) and shares each
prompt's prefill among its samples. Without it (not installed yet, or failing on this model: one
warning, then transformers for the rest of the run) `model.generate` samples with the same
settings; there the prompts are prefilled once and the KV cache is repeated per sample, so a group
still shares one prefill.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..device import model_device

logger = logging.getLogger("velotune")
# transformers renamed `past_key_values` to `cache` after 5.2x (the decoder reads both the same way)
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass(frozen=True)
class Sampling:
    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]  # up to and including the stop token
    finished: bool  # stopped by an end token (False: cut at max_tokens)


KEEP_CACHE_FRACTION = 0.125  # keep the engine's KV cache between steps while it is below this share of the weights


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Sampler:
    """Remembers whether the engine works for this run (a failing engine is tried once, not every step),
    and gives the engine's KV cache back before the training step when it is large.

    The engine keeps its KV cache and CUDA graphs between calls (`inference.resident_of`): the next
    generation then skips the graph captures. But the cache stays allocated through the training step,
    so its bytes add to the step's peak: 8 rows x 20K tokens of an 8B model is 21 GB. Kept while it is
    below keep_cache_fraction of the model's weight bytes (8B at 8 x 512 tokens: 0.7 of 16 GB), given
    back (`inference.release`) above it (8B at 8 x 4K: 4.4 GB; 1B at 8 x 4K: 1.1 of 2.5 GB).
    keep_cache_fraction 0: always give it back; inf: always keep."""

    def __init__(self, engine: str = "auto", keep_cache_fraction: float = KEEP_CACHE_FRACTION):
        self.engine_ok: bool | None = None if engine == "auto" else engine == "velotune"
        self.last_engine = None
        self.keep_cache_fraction = keep_cache_fraction
        self.released = 0  # times the cache was given back after a generation

    def __call__(self, model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.engine_ok is not False:
                    result = self._engine(model, tokenizer, prompts, sampling)
                    if result is not None:
                        self.last_engine = "velotune"
                        return result
                self.last_engine = "transformers"
                return transformers_sample(model, tokenizer, prompts, sampling)
        finally:
            model.train(was_training)
            self._release_if_large(model)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what generation freed goes back before the training step

    def _release_if_large(self, model) -> None:
        try:
            from ..inference import release, resident_of
        except ImportError:
            return
        kept = resident_of(model)
        if kept is not None and kept.cache.nbytes > self.keep_cache_fraction * weight_bytes(model):
            release(model)
            self.released += 1

    def _engine(self, model, tokenizer, prompts, sampling):
        try:
            from ..inference import SamplingParams, generate_batch
        except ImportError:
            self.engine_ok = False
            logger.info("velotune: GRPO samples with transformers' generate (velotune.inference is not available)")
            return None
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, min_p=sampling.min_p or 0.0, max_tokens=sampling.max_tokens,
                                repetition_penalty=sampling.repetition_penalty,
                                seed=sampling.seed)
        try:
            outputs = generate_batch(model, prompts, params, tokenizer=tokenizer)
        except Exception as error:  # noqa: BLE001 - the first call decides; later failures raise
            if self.engine_ok:
                raise
            self.engine_ok = False
            logger.warning("velotune: the fast generation engine failed on this model (%s: %s); GRPO samples with "
                           "transformers' generate for the rest of this run", type(error).__name__, error)
            return None
        self.engine_ok = True
        return [[Completion(list(o.token_ids), o.finish_reason != "length") for o in request.outputs]
                for request in outputs]


def stop_ids(model, tokenizer) -> list[int]:
    """The end-of-turn / end-of-text ids generation stops at (the generation config's and the tokenizer's)."""
    ids = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def transformers_sample(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
    """`model.generate` with one prefill per prompt: the prompts minus their last token are run once, the
    cache is repeated n times, and generate continues from it (it only feeds the uncached last token)."""
    device = model_device(model)
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else stops[0]
    ids, mask = left_pad(prompts, pad, device)  # (P, L)
    settings = dict(do_sample=True, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=sampling.top_k or None, min_p=sampling.min_p,
                    repetition_penalty=sampling.repetition_penalty, eos_token_id=stops, pad_token_id=pad)
    if sampling.temperature == 0:
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
    n = sampling.n
    cache = None
    if ids.shape[1] > 1:
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = getattr(prefill, CACHE_KEY, None)
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(n)
        else:
            cache = None
    expanded_ids, expanded_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # (P * n, L)
    if cache is not None:
        out = model.generate(input_ids=expanded_ids, attention_mask=expanded_mask, **{CACHE_KEY: cache}, **settings)
    else:
        out = model.generate(input_ids=expanded_ids, attention_mask=expanded_mask, **settings)
    new = out[:, ids.shape[1]:].tolist()  # (P * n, <= max_tokens)
    stop_set = set(stops)
    completions = []
    for row in new:
        end = next((k for k, t in enumerate(row) if t in stop_set), None)
        completions.append(Completion(row[:end + 1], True) if end is not None else Completion(row, False))
    return [completions[p * n:(p + 1) * n] for p in range(len(prompts))]
