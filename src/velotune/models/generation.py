"""`generate` inputs as the documentation passes them.

transformers 5's `tokenizer.apply_chat_template(..., tokenize=True, return_tensors="pt")` returns a
`BatchEncoding` (a mapping holding `input_ids` and `attention_mask`), no longer a tensor, and the
docs' standard inference cell passes it on as `model.generate(input_ids=inputs, ...)`.
`GenerationMixin.generate` then fails with a bare AttributeError. Our model classes (the decoder
and the PEFT wrapper) unpack such a mapping into keyword arguments first, so its attention mask
is used too (a left-padded batch generates as if passed with `**inputs`). Only our own classes
do this; transformers itself is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_HOW = ("pass the tokenizer's tensors, e.g. inputs = tokenizer.apply_chat_template(messages, "
        "add_generation_prompt=True, return_tensors='pt', return_dict=True), then model.generate(**inputs)")


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.to(b.device), b))
    return False


def unpack_generate_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) for `GenerationMixin.generate` with a mapping given as `inputs` (first
    positional argument or keyword) or as `input_ids` spread into keyword arguments.

    A key given both inside the mapping and as its own argument must hold the same value;
    otherwise the call is ambiguous and raises ValueError naming the key."""
    if args and isinstance(args[0], Mapping):
        encoding, source = args[0], "inputs"
        args = (None, *args[1:])  # keep later positional arguments (generation_config, ...) in place
    else:
        source = next((k for k in ("input_ids", "inputs") if isinstance(kwargs.get(k), Mapping)), None)
        if source is None:
            return args, kwargs
        kwargs = dict(kwargs)
        encoding = kwargs.pop(source)
    if "input_ids" not in encoding:
        raise ValueError(f"generate({source}=...) got a mapping without 'input_ids' (its keys: {sorted(encoding)}); "
                         + _HOW)
    if not isinstance(encoding["input_ids"], torch.Tensor):
        raise ValueError(f"generate({source}=...) got input_ids of type {type(encoding['input_ids']).__name__}, "
                         "not a tensor: tokenize with return_tensors='pt'")
    kwargs = dict(kwargs)
    for key, value in encoding.items():
        given = kwargs.get(key)
        if given is not None and not _same(given, value):
            raise ValueError(f"generate got {key!r} twice, inside {source}=... and as its own argument, with "
                             f"different values; pass it once ({_HOW})")
        kwargs[key] = value
    return args, kwargs
