"""velotune's SFT trainer: TRL's `SFTTrainer`, accepting the Unsloth API's older keyword arguments.

Why a subclass: TRL 1.x moved `dataset_text_field`, `max_seq_length`, `packing`,
`dataset_num_proc` into `SFTConfig` and renamed `tokenizer` to `processing_class`; the docs
still pass them to the trainer. We patch nothing in TRL: this class maps them onto
`TrainingArguments` (our `SFTConfig`) and adds what the docs promise: `embedding_learning_rate`,
checks before any work, a memory estimate, row counts for truncation, atomic checkpoints,
Ctrl-C that saves, a stop on a non-finite loss that names its batch, tokens/s and memory in the
logs, a loss plot and a summary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments as HFTrainingArguments
from transformers.trainer_callback import ProgressCallback
from trl import SFTTrainer as TRLSFTTrainer
from trl.trainer import sft_trainer as trl_sft_module

from ..export.folders import file_states
from ..fast.plan import find_decoder, is_sharded
from ..launch import quiet_replicas
from . import checkpoints_dcp
from . import dataset_prep
from . import distributed
from . import fsdp
from . import resume as resume_checks
from .arguments import TrainingArguments
from .callbacks import LossPlotCallback, ProgressFieldsCallback, SummaryCallback, peak_memory_bytes
from .checkpoints import (STAGING, InterruptCallback, clear_stale_staging, ctrl_c_saves, fsync_tree, ours, publish,
                          rotate, save_failed, write_marker)
from .memory import check_memory, device_memory, estimate
from .run_lock import RunLock, check_free

logger = logging.getLogger("velotune")

# Older trainer keywords (TRL < 0.20 and the docs) that now live in SFTConfig, under their new names.
RENAMED = {"max_seq_length": "max_length"}
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
# Arguments that hold credentials: never pickled into a checkpoint's training_args.bin.
SECRET_FIELDS = ("hub_token", "push_to_hub_token")
MODEL_CARD_SIGNATURE = "model card written by velotune"


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a micro-batch's loss was NaN or infinite."""


# TRL before its own fused LM head (0.24) reads `outputs.logits` after the loss for its entropy and
# accuracy metrics, so this trainer asks our model for them (its fast path builds none otherwise).
# TRL 1.x runs our backbone through its fused head (`add_fused_lm_head`) and reads no logits of ours.
TRL_READS_LOGITS = not hasattr(trl_sft_module, "add_fused_lm_head")


def to_training_arguments(args, overrides: dict, model=None) -> TrainingArguments:
    """Any TrainingArguments/SFTConfig (or None) plus trainer-level keywords -> our TrainingArguments."""
    if args is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        values = {"output_dir": f"outputs/{Path(str(name)).name}-SFT"}
    elif isinstance(args, HFTrainingArguments):
        values = _explicit_values(args)
    else:
        raise TypeError(f"args must be TrainingArguments or SFTConfig, got {type(args).__name__}")
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {k: v for k, v in values.items() if k in known}
    values.update(overrides)
    # The docs set the sequence length once, in from_pretrained(max_seq_length=...), and expect the
    # trainer to cut rows there: it is the default max_length when the user sets none.
    model_length = getattr(model, "max_seq_length", None)
    inherit = model_length is not None and not {"max_length", "max_seq_length"} & values.keys()
    if inherit:
        values["max_length"] = model_length
        logger.info("velotune: max_length=%d, the max_seq_length given to from_pretrained", model_length)
    if type(args) is TrainingArguments and not overrides and not inherit:
        return args
    return TrainingArguments(**values)


def _explicit_values(args) -> dict:
    """The fields of `args` that differ from their defaults (to_dict() would mask every *_token field)."""
    values = {}
    for f in dataclasses.fields(args):
        if not f.init or not hasattr(args, f.name):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        try:
            same = bool(value == default)
        except Exception:  # noqa: BLE001 - e.g. tensors or objects without equality
            same = False
        if not same:
            values[f.name] = value
    return values


def _split_legacy(kwargs: dict) -> dict:
    """Pop the keywords that belong in TrainingArguments off the trainer's kwargs."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    overrides = {}
    for key in list(kwargs):
        name = RENAMED.get(key, key)
        if name in fields:
            value = kwargs.pop(key)
            if value is not None:
                overrides[name] = value
    return overrides


class SFTTrainer(TRLSFTTrainer):
    """TRL's SFTTrainer with the Unsloth API's arguments and velotune's checks and reports.

    Accepts both `SFTTrainer(model, tokenizer=..., dataset_text_field=..., max_seq_length=...,
    packing=..., dataset_num_proc=..., args=TrainingArguments(...))` (the docs) and TRL 1.x's
    `SFTTrainer(model, processing_class=..., args=SFTConfig(...))`.
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, **kwargs):
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise ValueError("pass the tokenizer once: tokenizer= (older TRL) or processing_class= (TRL 1.x)")
            processing_class = tokenizer
        if model is None:
            raise ValueError("model is required: pass the model FastLanguageModel.from_pretrained returned")
        args = to_training_arguments(args, _split_legacy(kwargs), model)
        sharding = fsdp.requested(args)  # fsdp=True: velotune shards the model itself (training/fsdp.py says why)
        if sharding is not None:
            fsdp.check_shardable(model, args)
            args = copy.copy(args)  # the caller's arguments keep their fsdp switch
            args.fsdp, args.fsdp_plugin_args = None, None  # so accelerate neither shards again nor wraps in DDP
        distributed.check_launch(args, model)
        distributed.apply_ddp_defaults(args)
        quiet_replicas()
        if args.process_index == 0:  # rank 0 holds the run lock (under DDP every rank shares one output_dir)
            check_free(args.output_dir)  # a second run into a folder in use fails before any work
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        train_dataset = dataset_prep.as_dataset(train_dataset, "train")  # TRL takes no list of rows
        train_dataset = dataset_prep.standardize_roles(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: dataset_prep.standardize_roles(v, f"eval[{k}]") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = dataset_prep.standardize_roles(eval_dataset, "eval")
        formatting_func = kwargs.get("formatting_func")
        for name, dataset in [("train", train_dataset)] + (list(eval_dataset.items()) if isinstance(
                eval_dataset, dict) else [("eval", eval_dataset)]):
            if dataset is not None:
                dataset_prep.check_text_field(dataset, args.dataset_text_field, formatting_func, name)
                dataset_prep.check_text_values(dataset, args.dataset_text_field, formatting_func, name)
        if isinstance(model, torch.nn.Module) and args.memory_check != "off":
            self.memory_estimate = _estimate_for(model, args)
            if sharding is not None and args.world_size > 1:  # each GPU keeps its share of the sharded terms
                self.memory_estimate = fsdp.per_rank(self.memory_estimate, args.world_size)
            check_memory(self.memory_estimate, device_memory(args.device), args.memory_check, args.device)
        self._interrupt = InterruptCallback()
        self._lock = RunLock(args.output_dir)
        self._hidden_limit = None  # save_total_limit while train() keeps it from transformers
        self.summary = SummaryCallback()
        self._saving_checkpoint = False
        self._last_log = None
        self._sharding = sharding  # checkpoints are distributed checkpoints whenever fsdp was asked for
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.data_collator = dataset_prep.SampleIndexCollator(self.data_collator)
        if sharding is not None and fsdp.active():
            fsdp.shard(self.model, sharding, self.args)
            logger.info("velotune: FSDP2: %d ranks share every decoder layer's weights, gradients and optimizer "
                        "state", self.args.world_size)
        elif sharding is not None:
            logger.info("velotune: fsdp=True in one process: nothing to shard, training unsharded (checkpoints "
                        "are still distributed checkpoints)")
        if not self.args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.add_callback(ProgressFieldsCallback)
        for callback in (self._interrupt, self.summary, LossPlotCallback()):
            self.add_callback(callback)

    # ----- data -----
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not isinstance(dataset, Dataset):  # streaming: TRL's own path, no counts
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        tokenize_only = copy.copy(args)
        tokenize_only.max_length = None
        tokenize_only.shuffle_dataset = False
        dataset = super()._prepare_dataset(dataset, processing_class, tokenize_only, False, formatting_func,
                                           dataset_name)
        dataset_prep.require_rows(dataset, dataset_name)
        if dataset_prep.SAMPLE_INDEX not in dataset.column_names:
            dataset = dataset.map(lambda _, i: {dataset_prep.SAMPLE_INDEX: i}, with_indices=True)
        cut = None if packing and args.packing_strategy != "bfd" else args.max_length
        dataset = dataset_prep.drop_untrainable(dataset, dataset_name, cut, args.truncation_mode,
                                                args.completion_only_loss, args.assistant_only_loss)
        if packing:
            if args.max_length is None:
                raise ValueError("packing=True needs max_seq_length (max_length) to know the packed row length")
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = dataset_prep.pack(dataset, args.max_length, args.packing_strategy, dataset_name,
                                        args.dataset_num_proc)
        elif args.max_length is not None:
            dataset = dataset_prep.truncate_and_count(dataset, args.max_length, args.truncation_mode, dataset_name,
                                                      args.dataset_num_proc)
        dataset_prep.require_rows(dataset, dataset_name)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and dataset_prep.SAMPLE_INDEX not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [dataset_prep.SAMPLE_INDEX]

    # ----- loss -----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(dataset_prep.SAMPLE_INDEX, None)
        if TRL_READS_LOGITS and find_decoder(model) is not None:
            inputs["return_logits"] = True
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, *args, **kwargs):
        rows = inputs.get(dataset_prep.SAMPLE_INDEX)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            rows = rows.tolist() if torch.is_tensor(rows) else "unknown"
            last = _last_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1} in a batch of "
                f"train_dataset rows {rows}; training stopped before the optimizer step, so the weights are those "
                f"of step {self.state.global_step}. Last good checkpoint: {last or 'none saved'}. Check those rows "
                "(e.g. labels, very long or empty text), lower learning_rate, or use bf16 instead of fp16")
        return loss

    # ----- optimizer -----
    def create_optimizer(self, model=None):
        if self.args.embedding_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            embedding = any(part in name for part in EMBEDDING_NAMES)
            key = (embedding, name in decay)
            groups.setdefault(key, []).append(param)
        if not any(embedding for embedding, _ in groups):
            logger.warning("velotune: embedding_learning_rate is set but neither embed_tokens nor lm_head trains; "
                           "add them to target_modules to train them")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        param_groups = []
        for (embedding, decays), params in sorted(groups.items(), key=lambda item: item[0]):  # main lr first (logged)
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if embedding:
                group["lr"] = self.args.embedding_learning_rate
            param_groups.append(group)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ----- reporting -----
    def log(self, logs, start_time=None):
        if self.model.training and "loss" in logs:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            if self._last_log is not None and tokens > self._last_log[1]:
                logs["tokens_per_second"] = round((tokens - self._last_log[1]) / max(now - self._last_log[0], 1e-9), 1)
            self._last_log = (now, tokens)
            logs["peak_memory_gb"] = round(peak_memory_bytes(self.args.device) / 1024 ** 3, 3)
        return super().log(logs, start_time) if start_time is not None else super().log(logs)

    # ----- FSDP2 (training/fsdp.py, training/checkpoints_dcp.py) -----
    def _move_model_to_device(self, model, device):
        if self._sharding is not None and fsdp.active():
            return None  # sharding moves each rank's shards to its device, layer by layer (a host-loaded model too)
        return super()._move_model_to_device(model, device)

    def _wrap_model(self, model, training=True, dataloader=None):
        if self._sharding is not None and training and is_sharded(self.model):
            return model if isinstance(model, fsdp.ShardedModel) else fsdp.ShardedModel(self.model)
        return super()._wrap_model(model, training, dataloader)

    def save_model(self, output_dir=None, _internal_call=False):
        """Sharded: a checkpoint's weights go into a distributed checkpoint (every rank writes its shards); any
        other save gathers the whole (LoRA: adapter) state onto rank 0, which writes an ordinary folder."""
        if self._sharding is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self._saving_checkpoint:
            checkpoints_dcp.save(self.model, None, output_dir)
            if self.args.should_save:
                self._save_configs(output_dir)
            return None
        if not is_sharded(self.model):
            return super().save_model(str(output_dir), _internal_call)
        state = checkpoints_dcp.full_state_dict(self.model)  # a collective: every rank takes part
        if self.args.should_save:
            self._save(str(output_dir), state_dict=state)
        distributed.barrier()
        return None

    def _save_configs(self, folder: Path) -> None:
        """What consolidation and a resume read beside the weights: config, adapter config, tokenizer."""
        peft_config = getattr(self.model, "peft_config", None)
        base = self.model.get_base_model() if peft_config else self.model
        base.config.save_pretrained(folder)
        if peft_config:
            adapter = copy.copy(peft_config["default"])
            if adapter.base_model_name_or_path is None:  # as PEFT's own save fills it: the name the base loaded from
                adapter.base_model_name_or_path = base.__dict__.get("name_or_path") or base.config._name_or_path
            adapter.save_pretrained(folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self._sharding is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        checkpoints_dcp.save_optimizer(self.model, _torch_optimizer(self.optimizer), Path(output_dir))
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / checkpoints_dcp.SCHEDULER_FILE)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not checkpoints_dcp.is_dcp_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        checkpoints_dcp.load(self.model, None, Path(resume_from_checkpoint))  # any number of ranks reads it
        return None

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if not checkpoints_dcp.is_dcp_checkpoint(best):
            return super()._load_best_model()
        logger.info("velotune: loading the best model from %s (score: %s)", best, self.state.best_metric)
        checkpoints_dcp.load(self.model, None, Path(best))  # every rank reads its shards
        return None

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not checkpoints_dcp.is_dcp_checkpoint(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        checkpoints_dcp.load_optimizer(self.model, _torch_optimizer(self.optimizer), Path(checkpoint))
        scheduler = Path(checkpoint) / checkpoints_dcp.SCHEDULER_FILE
        if self.lr_scheduler is not None and scheduler.is_file():
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        return None

    # ----- checkpoints -----
    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING, self._lock.run_id) if self._saving_checkpoint else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / self._lock.run_id / name
        if staged.exists() and self.args.should_save:
            shutil.rmtree(staged)  # this run's own, left by a failed save
        distributed.barrier()  # cleared before any rank writes into it
        self._saving_checkpoint = True
        limit, before = self._rotation_limit(), self.args.save_total_limit
        self.args.save_total_limit = None  # velotune rotates (below), over its own checkpoints only
        try:
            super()._save_checkpoint(model, trial)
            distributed.barrier()  # every rank has written its files (rng_state_<rank>.pth) into the staged folder
            if self.args.should_save:
                write_marker(staged, self._lock.run_id, self.state.global_step)
                fsync_tree(staged)
        except Exception as error:  # a full disk or the file-size limit: name the file and the last good checkpoint
            named = save_failed(error, staged, {}, name, _last_checkpoint(run_dir),
                                note=" (its half-written folder was removed)", weights=self._weights_files())
            if named is None:
                raise
            shutil.rmtree(staged, ignore_errors=True)
            for empty in (staged.parent, staged.parent.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only when empty
            raise named from error
        finally:
            self._saving_checkpoint = False
            self.args.save_total_limit = before
        if self.state.best_model_checkpoint and STAGING in Path(self.state.best_model_checkpoint).parts:
            self.state.best_model_checkpoint = str(run_dir / Path(self.state.best_model_checkpoint).name)
        if self.args.should_save:
            publish(staged, run_dir / name)
            for empty in (staged.parent, staged.parent.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only when empty
            rotate(run_dir, limit, self.state.best_model_checkpoint)
        distributed.barrier()  # published before any rank reads it (load_best_model_at_end, a resume)

    def _weights_files(self) -> tuple[str, ...]:
        """The safetensors file a save writes first (named when safetensors fails and deletes it)."""
        return ("adapter_model.safetensors",) if hasattr(self.model, "peft_config") else ("model.safetensors",)

    def _rotation_limit(self):
        """save_total_limit as the user set it: train() hides it from transformers, whose end-of-run cleanup
        (save_total_limit=1 with a best model) deletes any folder matching `checkpoint-<n>*`."""
        return self._hidden_limit if self._hidden_limit is not None else self.args.save_total_limit

    def _keep_only_best(self) -> None:
        """transformers' end of run with save_total_limit=1 and a best model, over velotune's checkpoints only."""
        best = self.state.best_model_checkpoint
        if self._rotation_limit() == 1 and best and self.args.should_save:
            for _, path in ours(Path(self.args.output_dir)):
                if path.resolve() != Path(best).resolve():
                    shutil.rmtree(path, ignore_errors=True)

    def _save(self, output_dir=None, state_dict=None):
        """transformers pickles the whole arguments object into training_args.bin: blank the secrets first."""
        secrets = {name: getattr(self.args, name) for name in SECRET_FIELDS if getattr(self.args, name, None)}
        # PEFT's save_pretrained rewrites an existing README.md as its model card; a user's README stays as it was.
        readme = Path(output_dir if output_dir is not None else self.args.output_dir) / "README.md"
        users = readme.read_bytes() if readme.is_file() else None
        if users is not None and MODEL_CARD_SIGNATURE.encode() in users:
            users = None
        before = {} if self._saving_checkpoint else file_states(readme.parent)
        try:
            for name in secrets:
                setattr(self.args, name, None)
            return super()._save(output_dir, state_dict=state_dict)
        except Exception as error:  # the final save_model ran out of room: name the file, point at the checkpoint
            named = None if self._saving_checkpoint else save_failed(
                error, readme.parent, before, f"the model in {readme.parent}", _last_checkpoint(self.args.output_dir),
                weights=self._weights_files())
            if named is None:
                raise
            raise named from error
        finally:
            for name, value in secrets.items():
                setattr(self.args, name, value)
            if users is not None and (not readme.is_file() or readme.read_bytes() != users):
                readme.write_bytes(users)

    def create_model_card(self, *args, **kwargs):
        """TRL writes output_dir/README.md at every checkpoint; a README velotune did not write stays."""
        path = Path(self.args.output_dir) / "README.md"
        if path.is_file() and MODEL_CARD_SIGNATURE not in path.read_text(errors="replace"):
            if not getattr(self, "_card_notice", False):
                self._card_notice = True
                logger.warning("velotune: %s was not written by velotune; it is left as it is (no model card "
                               "written there)", path)
            return None
        result = super().create_model_card(*args, **kwargs)
        if path.is_file():
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"\n<!-- {MODEL_CARD_SIGNATURE} -->\n")
        return result

    # ----- the run -----
    def _start_run(self) -> str:
        self._lock.acquire()
        try:
            clear_stale_staging(Path(self.args.output_dir), self._lock.run_id)
        except BaseException:
            self._lock.release()
            raise
        return self._lock.run_id

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._interrupt.requested = False
        self._last_log = None
        if self._lock.folder != Path(self.args.output_dir):  # output_dir changed since __init__
            self._lock = RunLock(self.args.output_dir)
        # Rank 0 takes the lock and clears stale staging; every rank stages checkpoints under its run id.
        self._lock.run_id = distributed.agree_on_run(self._start_run)
        try:
            checkpoint = resume_checks.resolve(resume_from_checkpoint, self.args.output_dir)
            if checkpoint is not None:
                resume_checks.check_adapter_matches(self.model, checkpoint)
                finished = resume_checks.finished_output(self, checkpoint)
                if finished is not None:
                    return finished
            self._hidden_limit, self.args.save_total_limit = self.args.save_total_limit, None
            try:
                with ctrl_c_saves(self._interrupt):
                    result = super().train(str(checkpoint) if checkpoint is not None else resume_from_checkpoint,
                                           *args, **kwargs)
                self._keep_only_best()
            finally:
                self.args.save_total_limit, self._hidden_limit = self._hidden_limit, None
        finally:
            self._lock.release()
        if self._interrupt.requested:
            last = _last_checkpoint(self.args.output_dir)
            logger.warning("velotune: stopped by Ctrl-C after step %d; checkpoint %s. Resume with "
                           "trainer.train(resume_from_checkpoint=True)", self.state.global_step, last)
            raise KeyboardInterrupt(f"training interrupted; checkpoint saved to {last}")
        return result


def _estimate_for(model, args: TrainingArguments):
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else next(model.parameters()).dtype
    length = args.max_length or getattr(model, "max_seq_length", None) or 2048
    optim = str(getattr(args.optim, "value", args.optim))
    checkpointing = None if not args.gradient_checkpointing else True
    return estimate(model, args.per_device_train_batch_size, length, optim, dtype, checkpointing, device=args.device)


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (DCP reads its state by parameter)."""
    return getattr(optimizer, "optimizer", optimizer)


def _last_checkpoint(output_dir) -> str | None:
    """The checkpoint `train(resume_from_checkpoint=True)` would resume from (velotune's newest first)."""
    found = resume_checks.resolve(True, output_dir)
    return str(found) if found is not None else None


# The Unsloth API's and transformers' names for the same trainer.
Trainer = SFTTrainer
UnslothTrainer = SFTTrainer
