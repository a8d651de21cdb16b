"""Preference training (DPO, KTO, ORPO, CPO/SimPO) through TRL's trainers, with the docs' keywords.

Why subclasses: the docs' cell `DPOTrainer(model, ref_model=None, args=TrainingArguments(warmup_ratio=...),
beta=0.1, tokenizer=tokenizer, max_length=1024, max_prompt_length=512)` was written for TRL < 1.0, which
took config fields as trainer keywords and `tokenizer` instead of `processing_class`. These classes take
both spellings, move the fields into velotune's config of the trainer (rl/preference_config.py) and
leave the training itself to TRL: the loss, the reference pass and the metrics are TRL's, so parity
with TRL holds by construction and tests/rl/test_preference.py checks our model against
transformers' under them. Nothing in TRL is patched; TRL's own trainers accept velotune models too.

Added on top of TRL:
- rows with an empty answer are refused before any work, naming the dataset, row and column;
- `max_prompt_length` (TRL 1.x dropped it) cuts prompts to their last tokens, as TRL < 1.0 did;
- the reference model: TRL 1.x copies a PEFT model's adapter into a frozen "ref" adapter. While the
  adapter is still at its initial value (every LoRA B zero) that copy computes exactly the base model,
  so velotune's DPO/KTO delete it and TRL disables the adapter for the reference pass instead: no copy,
  and the reference forward runs the base weights only. An adapter that already learned something
  (DPO after SFT) keeps TRL's copy, which is then the right reference.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging

from datasets import Dataset
from peft import PeftModel
from trl import DPOTrainer as TRLDPOTrainer
from trl import KTOTrainer as TRLKTOTrainer
from transformers import TrainingArguments as HFTrainingArguments

from ..training.trainer import _explicit_values
from .experimental import trl_experimental
from .preference_config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, config_fields
from .preference_logps import ChunkedConcatenatedForward

logger = logging.getLogger("velotune")

REFERENCE_ADAPTER = "ref"  # the name TRL 1.x gives its copy of the trained adapter
ROWS_PER_READ = 1024  # rows read at a time by the empty-answer check


def PatchDPOTrainer() -> None:  # noqa: N802 - the docs' name
    """The docs call this before building a DPO/ORPO/KTO trainer; Unsloth rewrites TRL's classes there.

    velotune patches nothing: its trainers are ordinary subclasses (`from velotune import DPOTrainer`),
    and TRL's own trainers accept velotune models as they are. Kept so the docs' cells run unchanged.
    """
    return None


# ----- the docs' keywords -----
def _bind_positional(trl_init, args: tuple, kwargs: dict) -> dict:
    """Positional arguments by the TRL trainer's own order (DPO: model, ref_model, args, ...; ORPO: model,
    args, ...), merged into the keywords."""
    names = list(inspect.signature(trl_init).parameters)[1:]
    if len(args) > len(names):
        raise TypeError(f"takes at most {len(names)} positional arguments ({len(args)} given)")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"got multiple values for argument {name!r}")
        kwargs[name] = value
    return kwargs


def prepare_keywords(trl_class, config_class, args: tuple, kwargs: dict, suffix: str) -> dict:
    """The keywords for TRL's `trl_class.__init__`: `tokenizer` -> `processing_class`, config fields given
    to the trainer (beta, max_length, max_prompt_length, ...) moved into `args`, and `args` of any
    TrainingArguments class converted to `config_class` (its explicitly set fields)."""
    kwargs = _bind_positional(trl_class.__init__, args, dict(kwargs))
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is not None:
        if kwargs.get("processing_class") not in (None, tokenizer):
            raise ValueError("pass the tokenizer once: tokenizer= (older TRL, the docs) or processing_class= (TRL 1.x)")
        kwargs["processing_class"] = tokenizer
    trainer_params = set(inspect.signature(trl_class.__init__).parameters)
    fields = config_fields(config_class)
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in fields and key not in trainer_params}
    kwargs["args"] = to_config(kwargs.get("args"), config_class, overrides, kwargs.get("model"), suffix)
    return kwargs


def to_config(args, config_class, overrides: dict, model, suffix: str):
    """Any TrainingArguments/TRL config (or None) plus trainer-level keywords -> `config_class`. As in
    velotune's SFTTrainer, from_pretrained's max_seq_length is max_length when the user sets none."""
    explicit = _explicit_values(args) if isinstance(args, HFTrainingArguments) else {}
    model_length = getattr(model, "max_seq_length", None)
    inherit = model_length is not None and not {"max_length", "max_seq_length"} & (explicit.keys() | overrides.keys())
    if type(args) is config_class and not overrides and not inherit:
        return args
    if args is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        values = {"output_dir": f"{str(name).rstrip('/').split('/')[-1]}-{suffix}"}
    elif isinstance(args, HFTrainingArguments):
        values = {**_class_defaults_that_differ(args, config_class), **explicit}
    else:
        raise TypeError(f"args must be TrainingArguments or {config_class.__name__}, got {type(args).__name__}")
    known = config_fields(config_class)
    values = {key: value for key, value in values.items() if key in known}
    values.update(overrides)
    if inherit:
        values["max_length"] = model_length
        logger.info("velotune: max_length=%d, the max_seq_length given to from_pretrained", model_length)
    return config_class(**values)


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _class_defaults_that_differ(args, config_class) -> dict:
    """Values `args` holds by its class's default where `config_class` defaults otherwise: the user chose
    them by choosing that class (transformers' TrainingArguments trains at learning_rate 5e-5 without
    gradient checkpointing, as the docs' DPO cell did under TRL < 1.0; velotune's uses 8-bit AdamW). Only
    transformers' own training fields: a TRL field of the same name can mean another thing (SFT's
    loss_type "nll" is no DPO loss)."""
    training_fields = {f.name for f in dataclasses.fields(HFTrainingArguments)}
    target = {f.name: f for f in dataclasses.fields(config_class) if f.init and f.name in training_fields}
    values = {}
    for f in dataclasses.fields(args):
        if f.init and f.name in target and hasattr(args, f.name):
            try:
                differs = bool(_default(f) != _default(target[f.name]))
            except Exception:  # noqa: BLE001 - defaults without equality
                differs = False
            if differs:
                values[f.name] = getattr(args, f.name)
    return values


# ----- bad rows -----
def _is_empty(value) -> bool:
    """An answer with nothing in it: None, blank text, or messages whose contents are all blank."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):  # one message
        return _is_empty(value.get("content"))
    if isinstance(value, (list, tuple)):  # messages, or a message's content parts
        if value and isinstance(value[0], dict) and "type" in value[0] and "role" not in value[0]:
            return all(_is_empty(part.get("text")) if part.get("type") == "text" else False for part in value)
        return all(_is_empty(item) for item in value)
    return False


def check_answers(dataset, dataset_name: str, columns: tuple[str, ...]) -> None:
    """Refuse a row whose answer is empty, before tokenization: TRL would append EOS and train on a
    single end-of-sequence token as the whole answer, silently."""
    if not isinstance(dataset, Dataset):
        return  # streaming: rows are not at hand before training
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{dataset_name} has no {' / '.join(map(repr, missing))} column (its columns: "
                         f"{dataset.column_names}); preference rows need {', '.join(map(repr, columns))}")
    answers = dataset.select_columns(list(columns))
    for start in range(0, len(answers), ROWS_PER_READ):
        batch = answers[start:start + ROWS_PER_READ]
        for column in columns:
            for offset, value in enumerate(batch[column]):
                if _is_empty(value):
                    raise ValueError(
                        f"{dataset_name} row {start + offset}: the {column!r} answer is empty; every row needs a "
                        f"non-empty {' and '.join(map(repr, columns))} answer. Remove or fix that row (e.g. "
                        f"dataset = dataset.filter(lambda row: row[{column!r}].strip()) for text rows); nothing "
                        "was trained")


def check_datasets(kwargs: dict, columns: tuple[str, ...]) -> None:
    """Every split's answers; `columns` are the answers the trainer needs, except that paired rows
    (chosen and rejected) are also what KTO takes (TRL unpairs them)."""
    named = [("train_dataset", kwargs.get("train_dataset"))]
    evaluation = kwargs.get("eval_dataset")
    if isinstance(evaluation, dict):
        named += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in evaluation.items()]
    else:
        named.append(("eval_dataset", evaluation))
    for name, dataset in named:
        found = getattr(dataset, "column_names", None) or []
        paired = "chosen" in found and "rejected" in found
        check_answers(dataset, name, ("chosen", "rejected") if paired else columns)


# ----- the reference model -----
def adapter_is_identity(model, adapter: str = "default") -> bool:
    """True when `adapter` adds exactly nothing to the base model: every LoRA B (and embedding B) is zero,
    and no DoRA magnitude or fully trained module copy (modules_to_save) is in play."""
    config = model.peft_config.get(adapter)
    if config is None or getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None):
        return False
    found = False
    for name, param in model.named_parameters():
        if f".{adapter}." in name or name.endswith(f".{adapter}"):
            if "lora_B" in name or "lora_embedding_B" in name:
                found = True
                if bool(param.detach().ne(0).any()):
                    return False
            elif "lora_A" not in name and "lora_embedding_A" not in name:
                return False  # some other adapter parameter (a variant): not provably the identity
    return found


def drop_identity_reference(model, had_reference: bool) -> None:
    """Delete TRL's "ref" adapter copy when it equals the base model (see the module docstring)."""
    if had_reference or not isinstance(model, PeftModel) or REFERENCE_ADAPTER not in model.peft_config:
        return
    if not adapter_is_identity(model):
        logger.info("velotune: the adapter already differs from the base model, so the reference model is TRL's "
                    "frozen copy of it (adapter %r)", REFERENCE_ADAPTER)
        return
    model.delete_adapter(REFERENCE_ADAPTER)
    logger.info("velotune: reference model = this model with its adapter disabled (no copy)")


def _had_reference(kwargs: dict) -> bool:
    model = kwargs.get("model")
    return isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config


# ----- prompt length -----
def cut_prompt_ids(dataset, limit: int | None, dataset_name: str):
    """Keep the last `limit` prompt tokens of every row (TRL < 1.0's max_prompt_length)."""
    if limit is None:
        return dataset
    if isinstance(dataset, Dataset):
        longer = sum(len(ids) > limit for ids in dataset["prompt_ids"])
        if longer:
            logger.info("velotune: %d of %d %s prompts are longer than max_prompt_length=%d; each keeps its last "
                        "%d tokens", longer, len(dataset), dataset_name, limit, limit)
    return dataset.map(lambda row: {"prompt_ids": row["prompt_ids"][-limit:]})


def cut_tokenized_row(row: dict, limit: int | None) -> dict:
    """ORPO/CPO rows (prompt_*, chosen_*, rejected_* token lists, the answers' prompt part labelled -100):
    drop the first tokens of each prompt so at most `limit` remain."""
    if limit is None:
        return row
    cut = max(0, len(row["prompt_input_ids"]) - limit)
    if cut:
        for key in ("prompt_input_ids", "prompt_attention_mask"):
            row[key] = row[key][cut:]
    for side in ("chosen", "rejected"):
        labels = row.get(f"{side}_labels")
        if labels is None:
            continue
        prompt_len = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        drop = max(0, prompt_len - limit)
        if drop:
            for key in (f"{side}_input_ids", f"{side}_attention_mask", f"{side}_labels"):
                row[key] = row[key][drop:]
    return row


# ----- the trainers -----
class DPOTrainer(TRLDPOTrainer):
    """TRL's DPOTrainer, also taking the docs' keywords (tokenizer, beta, max_length, max_prompt_length and
    any other DPOConfig field; transformers' TrainingArguments as args); see the module docstring."""

    def __init__(self, *args, **kwargs):
        kwargs = prepare_keywords(TRLDPOTrainer, DPOConfig, args, kwargs, "DPO")
        check_datasets(kwargs, ("chosen", "rejected"))
        had_reference = _had_reference(kwargs)
        super().__init__(**kwargs)
        drop_identity_reference(self.model, had_reference)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        limit = getattr(args, "max_prompt_length", None)
        if limit is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        # TRL drops rows whose prompt alone fills max_length; with max_prompt_length the prompt is cut first.
        whole = copy.copy(args)
        whole.max_length = None
        dataset = cut_prompt_ids(super()._prepare_dataset(dataset, processing_class, whole, dataset_name), limit,
                                 dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
        return dataset


class KTOTrainer(TRLKTOTrainer):
    """TRL's KTOTrainer (prompt/completion/label rows), also taking the docs' keywords."""

    def __init__(self, *args, **kwargs):
        kwargs = prepare_keywords(TRLKTOTrainer, KTOConfig, args, kwargs, "KTO")
        check_datasets(kwargs, ("completion",))
        had_reference = _had_reference(kwargs)
        super().__init__(**kwargs)
        drop_identity_reference(self.model, had_reference)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return cut_prompt_ids(dataset, getattr(args, "max_prompt_length", None), dataset_name)


_TRLORPOTrainer = trl_experimental("orpo", "ORPOTrainer")
_TRLCPOTrainer = trl_experimental("cpo", "CPOTrainer")


class ORPOTrainer(ChunkedConcatenatedForward, _TRLORPOTrainer):
    """TRL's ORPOTrainer (reference-free), also taking the docs' keywords; log-probs without full logits
    (rl/preference_logps.py)."""

    def __init__(self, *args, **kwargs):
        kwargs = prepare_keywords(_TRLORPOTrainer, ORPOConfig, args, kwargs, "ORPO")
        check_datasets(kwargs, ("chosen", "rejected"))
        self._max_prompt_length = kwargs["args"].max_prompt_length  # read by tokenize_row during __init__
        super().__init__(**kwargs)

    def tokenize_row(self, feature, model=None):
        return cut_tokenized_row(super().tokenize_row(feature, model), self._max_prompt_length)

    def average_logps(self) -> bool:
        return True  # ORPO's odds ratio is of mean token log-probs

    def pad_value(self) -> int:
        return self.padding_value


class CPOTrainer(ChunkedConcatenatedForward, _TRLCPOTrainer):
    """TRL's CPOTrainer; SimPO is `CPOConfig(loss_type="simpo", cpo_alpha=0.0)`. Takes the docs' keywords;
    log-probs without full logits (rl/preference_logps.py)."""

    nll_over = "labels"  # CPO's behaviour-cloning term covers the chosen answer only
    logits_shifted = False

    def __init__(self, *args, **kwargs):
        kwargs = prepare_keywords(_TRLCPOTrainer, CPOConfig, args, kwargs, "CPO")
        check_datasets(kwargs, ("chosen", "rejected"))
        self._max_prompt_length = kwargs["args"].max_prompt_length
        super().__init__(**kwargs)

    def tokenize_row(self, feature, model=None):
        return cut_tokenized_row(super().tokenize_row(feature, model), self._max_prompt_length)

    def average_logps(self) -> bool:
        return self.loss_type in ("ipo", "simpo")  # length-normalized rewards

    def wants_nll(self) -> bool:
        return self.cpo_alpha != 0

    def pad_value(self) -> int:
        return self.pad_token_id
