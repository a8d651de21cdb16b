"""The engine's public calls: `generate_batch` (token ids in, for the GRPO trainer), `fast_generate`
(vLLM's `LLM.generate` shape, as the docs call it on the model) and `hf_generate` (transformers'
`generate` contract, which `FastLanguageModel.for_inference` routes to the engine).
"""

from __future__ import annotations

import logging

import torch

from ..fast.plan import log_once
from . import engine
from .adapters import LoRARequest, load_lora, save_lora, using_lora
from .cache import InferenceSettings
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams

logger = logging.getLogger("velotune")


def eos_ids_of(model, tokenizer=None) -> set[int]:
    """EOS ids from the generation config and the tokenizer (vLLM stops on both)."""
    ids: set[int] = set()
    config = getattr(engine.base_model(model), "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def generate_batch(model, prompts: list[list[int]], params: SamplingParams, tokenizer=None,
                   lora_request: LoRARequest | None = None) -> list[RequestOutput]:
    """Completions of token-id prompts: one RequestOutput per prompt with `params.n` outputs.

    `model`: our causal LM or a PEFT model (its active adapters apply, unmerged, as they are now).
    `.text` is decoded when `tokenizer` is given ('' otherwise)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a velotune.SamplingParams, got {type(params).__name__}")
    with using_lora(model, lora_request) as active:
        seqs = engine.generate(active, prompts, params, eos_ids_of(model, tokenizer), tokenizer)
    results = []
    for i, prompt in enumerate(prompts):
        prompt = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        outs = [_completion(s, params, tokenizer) for s in seqs[i * params.n:(i + 1) * params.n]]
        results.append(RequestOutput(str(i), None, prompt, outs))
    return results


def _completion(seq: engine.Sequence, params: SamplingParams, tokenizer) -> CompletionOutput:
    text = ""
    if tokenizer is not None and params.detokenize:
        text = tokenizer.decode(seq.tokens, skip_special_tokens=params.skip_special_tokens)
        if isinstance(seq.stop_reason, str):
            cut = text.find(seq.stop_reason)
            if cut >= 0:
                text = text[:cut + (len(seq.stop_reason) if params.include_stop_str_in_output else 0)]
    return CompletionOutput(seq.index, text, list(seq.tokens), seq.finish_reason, seq.logprobs, seq.stop_reason)


class GenerationEngine:
    """What `from_pretrained` attaches to a model as `model.generation_engine`: the inference
    settings it was given, the tokenizer it loaded (fast_generate decodes text with it), and
    whether `generate` runs on the engine (`FastLanguageModel.for_inference` turns that on,
    `for_training` off). The model classes' `fast_generate`, `save_lora`, `load_lora` and
    `generate` delegate here, so they work the same on our causal LM and on its PEFT wrapper."""

    def __init__(self, settings: InferenceSettings | None = None, tokenizer=None):
        self.settings = settings or InferenceSettings()
        self.tokenizer = tokenizer
        self.serves_generate = False
        self.resident = None  # the KV cache and CUDA graphs kept between calls (engine.py)

    def generate(self, model, fallback, *args, **kwargs):
        """transformers' `generate` on the engine when switched on and the arguments allow it, else `fallback`."""
        inputs = args[0] if args else kwargs.pop("inputs", None)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        base = engine.base_model(model)
        unserved = engine.unserved(base)  # Mllama: transformers' loop over our model (its cross layers cache the image)
        multimodal = hasattr(base, "prefill_inputs")  # a vision model on our decoder
        unsupported = engine_handles(kwargs, multimodal) if len(args) <= 1 else "positional arguments"
        if not self.serves_generate or inputs is None or unserved is not None or unsupported is not None:
            if self.serves_generate and unserved is not None:
                log_once(f"velotune: generate runs on transformers' loop, not velotune's engine: {unserved}")
            elif self.serves_generate and unsupported is not None:
                logger.info("velotune: generate(%s=...) runs on transformers' loop, not the engine", unsupported)
            if inputs is not None:
                kwargs["input_ids"] = inputs
            return fallback(*args[1:], **kwargs)
        return hf_generate(model, inputs, **kwargs)

    def fast_generate(self, model, *args, **kwargs):
        kwargs.setdefault("tokenizer", self.tokenizer)
        return fast_generate(model, *args, **kwargs)

    def save_lora(self, model, path) -> None:
        save_lora(model, path)

    def load_lora(self, model, path, load_tensors: bool = True) -> LoRARequest:
        return load_lora(model, path, self.settings)


def engine_of(model) -> GenerationEngine:
    """The engine object attached to `model` (or its base model), or a default one."""
    attached = getattr(engine.base_model(model), "generation_engine", None)
    return attached if isinstance(attached, GenerationEngine) else GenerationEngine()


def tokenizer_of(model, tokenizer=None):
    """The tokenizer given, else the one from_pretrained loaded with the model."""
    return tokenizer if tokenizer is not None else engine_of(model).tokenizer


def fast_generate(model, prompts=None, sampling_params: SamplingParams | None = None, use_tqdm: bool = False,
                  lora_request: LoRARequest | None = None, tokenizer=None, prompt_token_ids=None,
                  **kwargs) -> list[RequestOutput]:
    """vLLM's `LLM.generate`: prompts as a string, strings, token-id lists or {"prompt": ...} /
    {"prompt_token_ids": ...} dicts; returns one RequestOutput per prompt, in order."""
    if kwargs:
        raise TypeError(f"fast_generate got unexpected arguments {sorted(kwargs)}; sampling settings go in "
                        "sampling_params=SamplingParams(...)")
    params = sampling_params if sampling_params is not None else SamplingParams()
    tokenizer = tokenizer_of(model, tokenizer)
    if prompts is None:
        prompts = prompt_token_ids
    if prompts is None:
        raise ValueError("fast_generate needs prompts (text or token ids)")
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    texts, ids = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("fast_generate got text prompts but no tokenizer: pass tokenizer=, or token ids")
            texts.append(prompt)
            bos = getattr(tokenizer, "bos_token", None)
            ids.append(tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"])
        elif isinstance(prompt, (list, tuple, torch.Tensor)):
            texts.append(None)
            ids.append(prompt)
        else:
            raise ValueError(f"prompt {i}: expected a string, a list of token ids or a dict, got {type(prompt).__name__}")
    results = generate_batch(model, ids, params, tokenizer, lora_request)
    for result, text in zip(results, texts):
        result.prompt = text
    return results


# ---------------------------------------------------------------------------------------------
# transformers' generate contract (for_inference)

_ENGINE_KWARGS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k", "min_p",
                  "repetition_penalty", "eos_token_id", "pad_token_id", "use_cache", "num_return_sequences",
                  "min_new_tokens", "attention_mask", "streamer", "generation_config", "bos_token_id"}


# A vision-language processor's outputs, served for models whose language model is our decoder (they
# define `prefill_inputs`: image features and M-RoPE positions for the prefill; decoding is text only).
_MULTIMODAL_KWARGS = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids",
                      "second_per_grid_ts", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"}


def engine_handles(kwargs: dict, multimodal: bool = False) -> str | None:
    """None when hf_generate can serve these generate() arguments, else the first one it cannot."""
    for key, value in kwargs.items():
        if key in _ENGINE_KWARGS or value is None or multimodal and key in _MULTIMODAL_KWARGS:
            continue
        if key == "num_beams" and value == 1:
            continue
        if key in ("output_scores", "return_dict_in_generate", "output_logits") and not value:
            continue
        return key
    return None


def hf_generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """`generate(input_ids, attention_mask, max_new_tokens, do_sample, ..., streamer)` on the engine:
    returns (B * num_return_sequences, P + new) token ids, the prompt as given then the new tokens,
    rows that stopped early padded with pad_token_id, as transformers returns them."""
    gc = kwargs.get("generation_config") or getattr(engine.base_model(model), "generation_config", None)

    def setting(name, default=None):
        value = kwargs.get(name)
        if value is None:
            value = getattr(gc, name, None)
        return default if value is None else value

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids.cpu(), mask.cpu())]
    P = input_ids.shape[1]
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:
        max_new = getattr(gc, "max_new_tokens", None) or max(1, setting("max_length", 20) - P)
    sampled = bool(setting("do_sample", False))
    params = SamplingParams(
        n=int(setting("num_return_sequences", 1)), max_tokens=int(max_new), min_tokens=int(setting("min_new_tokens", 0)),
        temperature=float(setting("temperature", 1.0)) if sampled else 0.0,
        top_p=float(setting("top_p", 1.0)) if sampled else 1.0, top_k=int(setting("top_k", 0)) if sampled else 0,
        min_p=float(setting("min_p", 0.0)) if sampled else 0.0,
        repetition_penalty=float(setting("repetition_penalty", 1.0)))
    eos = setting("eos_token_id")
    eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    pad = setting("pad_token_id")
    pad = pad if pad is not None else (min(eos_ids) if eos_ids else 0)
    streamer = kwargs.get("streamer")
    if streamer is not None:
        if len(prompts) * params.n != 1:
            raise ValueError("a streamer streams one sequence: pass one prompt (batch size 1) with num_return_sequences=1")
        streamer.put(input_ids[0].cpu())
    on_token = None if streamer is None else (lambda s, token: streamer.put(torch.tensor([token])))
    prefill_inputs = _multimodal_prefill(model, kwargs, mask)
    try:
        # transformers' generate only warns past the model's context; so does this contract
        seqs = engine.generate(model, prompts, params, eos_ids, on_token=on_token, limit=P + params.max_tokens + 1,
                               prefill_inputs=prefill_inputs)
    finally:
        if streamer is not None:
            streamer.end()
    longest = max(len(s.tokens) for s in seqs)
    out = torch.full((len(seqs), P + longest), pad, dtype=input_ids.dtype)
    out[:, :P] = input_ids.cpu().repeat_interleave(params.n, dim=0)
    for row, seq in enumerate(seqs):
        out[row, P:P + len(seq.tokens)] = torch.tensor(seq.tokens, dtype=input_ids.dtype)
    return out.to(input_ids.device)


def _multimodal_prefill(model, kwargs: dict, mask: torch.Tensor):
    """The engine's `prefill_inputs` for a vision model's generate(**processor(...)) call, or None (text only).

    The engine lays the prompts out again (left-padded to its own length), so the per-token modality ids
    (`mm_token_type_ids`) are re-laid the same way; the image tensors do not depend on the layout (their
    features fill the image tokens in order)."""
    vision = {key: kwargs[key] for key in _MULTIMODAL_KWARGS if kwargs.get(key) is not None}
    types = vision.pop("mm_token_type_ids", None)
    if not vision:
        return None
    base = engine.base_model(model)
    row_types = None
    if types is not None:
        row_types = [row[keep.bool()] for row, keep in zip(types.cpu(), mask.cpu())]

    def prefill_inputs(ids: torch.Tensor, real: torch.Tensor):
        laid = None
        if row_types is not None:
            laid = torch.zeros_like(ids)  # (count, P)
            for i, row in enumerate(row_types):
                laid[i, ids.shape[1] - len(row):] = row.to(ids.device)
        return base.prefill_inputs(ids, real, laid, **vision)

    return prefill_inputs
