"""`DPOConfig`, `KTOConfig`, `ORPOConfig`, `CPOConfig`: TRL's configs plus the keywords the docs pass.

Why subclasses and not patches: the docs' DPO cell passes `warmup_ratio` (gone from transformers 5)
and `max_prompt_length` (gone from TRL 1.x), and the Unsloth notebooks pass both to every preference
trainer. Each class keeps TRL's field names and meaning, declares the old keywords as fields, and
runs velotune's argument checks and device defaults (`training.arguments.before_post_init`: fp16 on a
CPU-only machine trains in fp32, an 8-bit AdamW that cannot step falls back, gradient_checkpointing
moves to transformers 5.24's name). TRL's own trainers accept these objects unchanged.

`max_prompt_length` keeps meaning what it meant in TRL < 1.0: a longer prompt keeps its last
`max_prompt_length` tokens (the end, next to the answer); velotune's trainers apply it
(rl/preference.py), TRL's own trainers ignore the field.

Pickling (`training_args.bin`, written by transformers at every save) leaves the hub tokens out,
so a checkpoint shared on the hub does not carry the user's credential; copies keep them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from trl import DPOConfig as TRLDPOConfig
from trl import KTOConfig as TRLKTOConfig

from ..training.arguments import after_post_init, before_post_init
from ..training.compat import LEGACY_HELP
from .experimental import trl_experimental

# Arguments that hold credentials: never pickled into training_args.bin.
SECRET_FIELDS = ("hub_token", "push_to_hub_token")
PROMPT_HELP = ("Longest prompt in tokens (TRL < 1.0's max_prompt_length): a longer prompt keeps its last "
               "max_prompt_length tokens. None: prompts are not cut (max_length still bounds the whole row).")


@dataclass
class PreferenceConfigMixin:
    """The fields and behaviour every velotune preference config adds to its TRL parent."""

    max_prompt_length: int | None = field(default=None, metadata={"help": PROMPT_HELP})
    warmup_ratio: float | None = field(default=None, metadata={"help": LEGACY_HELP["warmup_ratio"]})
    max_seq_length: int | None = field(default=None, metadata={"help": LEGACY_HELP["max_seq_length"]})
    evaluation_strategy: str | None = field(default=None, metadata={"help": LEGACY_HELP["evaluation_strategy"]})

    def __post_init__(self):
        before_post_init(self)
        limit = self.max_prompt_length
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"max_prompt_length={limit!r}: must be a positive number of tokens, or None to keep "
                             "whole prompts")
        if limit is not None and self.max_length is not None and limit >= self.max_length:
            raise ValueError(f"max_prompt_length={limit} must be below max_length={self.max_length}: a prompt that "
                             "long leaves no room for the answer. Lower max_prompt_length or raise max_length")
        super().__post_init__()
        after_post_init(self)

    def __getstate__(self):
        """What pickle stores (transformers' training_args.bin): everything but the hub tokens."""
        state = dict(self.__dict__)
        for name in SECRET_FIELDS:
            if state.get(name) is not None:
                state[name] = None
        return state

    def __copy__(self):
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


@dataclass
class DPOConfig(PreferenceConfigMixin, TRLDPOConfig):
    """TRL's DPOConfig (beta, loss_type, max_length, precompute_ref_log_probs, ...) plus max_prompt_length
    and the docs' older keywords (warmup_ratio, max_seq_length, evaluation_strategy)."""


@dataclass
class KTOConfig(PreferenceConfigMixin, TRLKTOConfig):
    """TRL's KTOConfig (beta, desirable_weight, undesirable_weight, ...) plus max_prompt_length and the
    docs' older keywords."""


@dataclass
class ORPOConfig(PreferenceConfigMixin, trl_experimental("orpo", "ORPOConfig")):
    """TRL's ORPOConfig (beta is ORPO's lambda, max_completion_length, ...) plus max_prompt_length and the
    docs' older keywords."""


@dataclass
class CPOConfig(PreferenceConfigMixin, trl_experimental("cpo", "CPOConfig")):
    """TRL's CPOConfig; SimPO is `loss_type="simpo"` (with `cpo_alpha=0` for pure SimPO, `simpo_gamma` the
    target margin), plus max_prompt_length and the docs' older keywords."""


def config_fields(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.init}
