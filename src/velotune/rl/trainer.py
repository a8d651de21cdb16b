"""velotune's GRPOTrainer: our own GRPO loop on transformers' `Trainer` (optimizer, schedule, checkpoints,
callbacks, `report_to`), with TRL's `GRPOConfig` fields and reward-function signature.

One generation batch (per_device_train_batch_size x steps_per_generation completions) at a time:
1. sample num_generations completions of each prompt with the adapters being trained (one prefill
   per prompt; `rl/generation.py`), and give the KV cache's memory back;
2. score them with every reward function (errors name the function, the step and the completion;
   NaN scores are skipped and counted) and turn the totals into group-relative advantages;
3. when needed, the log-probabilities at sampling time (num_iterations > 1) and of the reference
   policy, which is the same model with its adapters disabled (beta > 0; beta = 0 skips it);
4. then each micro-batch's loss from chunked log-probabilities (no full logits), for
   steps_per_generation x num_iterations steps before sampling again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer
from transformers import TrainingArguments as HFTrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..training.callbacks import SummaryCallback, peak_memory_bytes
from .advantages import group_advantages, nanstd
from .callbacks import GRPOProgressCallback, RewardPlotCallback
from .config import GRPOConfig
from .generation import Sampler, Sampling, left_pad, stop_ids
from .logprobs import completion_logprobs
from .loss import LossSettings, clip_fractions, grpo_loss, masked_mean
from .reward_calls import NanCounter, call_reward_functions, reward_name
from .sampler import GroupRepeatSampler

logger = logging.getLogger("velotune")
TENSOR_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_attention", "loss_mask", "advantages",
               "old_logps", "ref_logps")


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def to_grpo_config(args, model) -> GRPOConfig:
    """None, TRL's GRPOConfig or transformers' TrainingArguments -> our GRPOConfig (explicitly set fields)."""
    if isinstance(args, GRPOConfig):
        return args
    if args is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        return GRPOConfig(output_dir=f"outputs/{Path(str(name)).name}-GRPO")
    if not isinstance(args, HFTrainingArguments):
        raise TypeError(f"args must be a GRPOConfig, got {type(args).__name__}")
    known = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    values = {}
    for f in dataclasses.fields(args):
        if not f.init or f.name not in known or not hasattr(args, f.name):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        try:
            same = bool(value == default)
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            values[f.name] = value
    values.pop("generation_batch_size", None)  # derived by __post_init__; passing both it and steps fails
    if "steps_per_generation" in values and values["steps_per_generation"] == values.get(
            "gradient_accumulation_steps", args.gradient_accumulation_steps):
        values.pop("steps_per_generation")
    return GRPOConfig(**values)


def check_dataset(dataset, name: str = "train_dataset") -> None:
    if dataset is None:
        raise ValueError(f"{name} is required: a dataset with a 'prompt' column (text or chat messages)")
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "features") and dataset.features is not None:
        columns = list(dataset.features)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column; its columns are {list(columns)}. GRPO samples completions of each row's "
            "prompt (a string, or a list of chat messages). Rename your question column, e.g. "
            "dataset = dataset.rename_column('question', 'prompt'), or build it with dataset.map(lambda x: "
            "{'prompt': [{'role': 'user', 'content': x['question']}]})")


def _identity(rows):
    return rows


class GRPOTrainer(Trainer):
    """GRPO (Group Relative Policy Optimization) on a velotune model, as the docs' notebooks call it::

        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[...],
                              args=GRPOConfig(...), train_dataset=dataset)

    reward_funcs: callables `f(prompts, completions, **columns) -> list[float]` (see velotune.rewards).
    The reference policy (beta > 0) is the model with its LoRA adapters disabled; a model without
    adapters gets a frozen copy instead (full fine-tuning).
    """

    def __init__(self, model=None, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if model is None or isinstance(model, str):
            raise ValueError("model must be a loaded model (FastLanguageModel.from_pretrained + get_peft_model), not "
                             f"{model!r}")
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise ValueError("pass the tokenizer once: tokenizer= or processing_class=")
            processing_class = tokenizer
        if processing_class is None:
            raise ValueError("processing_class is required: pass the tokenizer FastLanguageModel.from_pretrained "
                             "returned (processing_class=tokenizer)")
        if peft_config is not None and not hasattr(model, "peft_config"):
            raise ValueError("peft_config is not taken here: add adapters with FastLanguageModel.get_peft_model")
        if eval_dataset is not None:
            raise NotImplementedError("evaluation during GRPO is not supported by velotune's GRPOTrainer yet; "
                                      "leave eval_dataset unset")
        if reward_processing_classes is not None:
            raise NotImplementedError("reward models are not supported yet: pass reward functions")
        args = to_grpo_config(args, model)
        self.reward_funcs = self._check_reward_funcs(reward_funcs)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward "
                             f"functions ({[reward_name(f) for f in self.reward_funcs]}); give one weight per function")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        check_dataset(train_dataset)
        prompts_per_batch = args.generation_batch_size // args.num_generations
        if hasattr(train_dataset, "__len__") and len(train_dataset) < prompts_per_batch:
            raise ValueError(f"train_dataset has {len(train_dataset)} rows but one generation batch takes "
                             f"{prompts_per_batch} prompts (generation batch {args.generation_batch_size} / "
                             f"num_generations {args.num_generations}); add rows or lower per_device_train_batch_size")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        self.ref_model = None
        if args.beta != 0.0 and not hasattr(model, "disable_adapter"):
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
        super().__init__(model=model, args=args, data_collator=_identity, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        self.loss_is_scaled_for_ga = True  # grpo_loss divides by the accumulation steps (dapo spans them)
        self.num_generations = args.num_generations
        self._step = 0
        self._buffer = None
        self._metrics = defaultdict(list)
        self._sampler = Sampler()
        self._nan = NanCounter()
        self._truncated_prompts = 0
        self._stops = stop_ids(model, processing_class)
        if not self.args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.add_callback(GRPOProgressCallback)
        self.summary = SummaryCallback()
        for callback in (self.summary, RewardPlotCallback()):
            self.add_callback(callback)

    @staticmethod
    def _check_reward_funcs(reward_funcs) -> list:
        if reward_funcs is None:
            raise ValueError("reward_funcs is required: one or more functions f(prompts, completions, **columns) -> "
                             "list[float] (see velotune.rewards for the docs' GSM8K set)")
        functions = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not functions:
            raise ValueError("reward_funcs is empty: pass at least one reward function")
        for i, function in enumerate(functions):
            if isinstance(function, str):
                raise NotImplementedError(f"reward_funcs[{i}]={function!r}: reward models by name are not supported "
                                          "yet; pass a function")
            if not callable(function):
                raise TypeError(f"reward_funcs[{i}] is a {type(function).__name__}, not a function f(prompts, "
                                "completions, **columns) -> list[float]")
        return functions

    # ----- data -----
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        return GroupRepeatSampler(len(dataset), self.num_generations,
                                  self.args.generation_batch_size // self.num_generations,
                                  self.args.steps_per_generation * self.args.num_iterations,
                                  shuffle=self.args.shuffle_dataset, seed=self.args.seed)

    def get_train_dataloader(self):
        # One generation batch per draw: steps_per_generation micro-batches' worth of rows.
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _tokenize_prompt(self, prompt) -> list[int]:
        tokenizer = self.processing_class
        if is_conversational(prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("conversational prompts need the tokenizer's chat template, and this tokenizer has "
                                 "none: tokenizer = get_chat_template(tokenizer, chat_template='chatml') (from "
                                 "velotune.chat_templates), or give plain-text prompts")
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                 **(getattr(self.args, "chat_template_kwargs", None) or {}))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}: "
                            f"{prompt!r:.200}")
        limit = self.args.max_prompt_length
        if limit is not None and len(ids) > limit:
            self._truncated_prompts += 1
            if self._truncated_prompts == 1:
                logger.warning("velotune: a prompt of %d tokens was cut to its last max_prompt_length=%d tokens "
                               "(the count is logged as prompts/truncated)", len(ids), limit)
            ids = ids[-limit:]
        return ids

    # ----- generation and scoring -----
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            raise NotImplementedError("velotune's GRPOTrainer does not evaluate yet")
        every = self.args.steps_per_generation * self.args.num_iterations
        if self._buffer is None or self._step % every == 0:
            self._buffer = self._generate_and_score(generation_batch)
        return self._buffer[self._step % self.args.steps_per_generation]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _generate_and_score(self, rows: list[dict]) -> list[dict]:
        G, args, device = self.num_generations, self.args, self.accelerator.device
        step = self.state.global_step + 1
        prompts = [row["prompt"] for row in rows]
        unique = [self._tokenize_prompt(p) for p in prompts[::G]]
        sampling = Sampling(n=G, max_tokens=args.max_completion_length, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty)
        groups = self._sampler(self.model, self.processing_class, unique, sampling)
        completions_out = [c for group in groups for c in group]
        prompt_lists = [ids for ids in unique for _ in range(G)]
        completion_lists = [c.token_ids for c in completions_out]
        finished = torch.tensor([c.finished for c in completions_out], device=device)
        pad = self.processing_class.pad_token_id
        prompt_ids, prompt_mask = left_pad(prompt_lists, pad, device)  # (N, P)
        width = max(1, max(len(c) for c in completion_lists))
        completion_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)  # (N, C)
        attention = torch.zeros_like(completion_ids)
        for i, ids in enumerate(completion_lists):
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, :len(ids)] = 1
        loss_mask = attention.clone()
        if args.mask_truncated_completions:
            loss_mask = loss_mask * finished.unsqueeze(1).long()

        texts = self.processing_class.batch_decode(completion_lists, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t
                       for p, t in zip(prompts, texts)]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        scores, names = call_reward_functions(self.reward_funcs, prompts, completions, columns, step,
                                              extra={"completion_ids": completion_lists, "trainer_state": self.state})
        nan_counts = self._nan.record(scores, names, step)
        advantages, rewards, zero_std = group_advantages(
            scores, self.reward_weights, G, args.scale_rewards,
            getattr(args, "multi_objective_aggregation", "sum_then_normalize"))

        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                 "completion_attention": attention, "loss_mask": loss_mask, "advantages": advantages.to(device)}
        need_old = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
        if need_old:
            batch["old_logps"] = self._logps_no_grad(self.model, batch)
        if args.beta != 0.0:
            if self.ref_model is not None:
                if next(self.ref_model.parameters()).device != device:
                    self.ref_model.to(device)  # the copy was made before Trainer placed the policy
                batch["ref_logps"] = self._logps_no_grad(self.ref_model, batch)
            else:
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    batch["ref_logps"] = self._logps_no_grad(self.model, batch)

        self._record_batch_metrics(scores, names, rewards, zero_std, completion_lists, finished, nan_counts)
        self._maybe_print_samples(step, prompts, texts, rewards, scores, names)
        items = self.accelerator.gather(loss_mask.sum()).sum()  # dapo: completion tokens of the global batch
        micro = args.per_device_train_batch_size
        return [self._trim({**{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}, "num_items": items})
                for i in range(args.steps_per_generation)]

    @staticmethod
    def _trim(batch: dict) -> dict:
        """Drop the padding columns this micro-batch does not need (prompt: left; completion: right)."""
        prompt_keep = batch["prompt_mask"].any(0).nonzero()
        start = int(prompt_keep[0]) if len(prompt_keep) else 0
        completion_keep = batch["completion_attention"].any(0).nonzero()
        end = int(completion_keep[-1]) + 1 if len(completion_keep) else 1
        out = dict(batch)
        for key in ("prompt_ids", "prompt_mask"):
            out[key] = batch[key][:, start:]
        for key in ("completion_ids", "completion_attention", "loss_mask", "old_logps", "ref_logps"):
            if key in batch:
                out[key] = batch[key][:, :end]
        return out

    @torch.no_grad()
    def _logps_no_grad(self, model, batch: dict) -> torch.Tensor:
        out = []
        micro = self.args.per_device_train_batch_size
        for start in range(0, batch["prompt_ids"].shape[0], micro):
            part = self._trim({k: v[start:start + micro] for k, v in batch.items() if k in TENSOR_KEYS})
            logps, _ = self._policy_logps(model, part)
            width = batch["completion_ids"].shape[1]
            out.append(torch.nn.functional.pad(logps, (0, width - logps.shape[1])))
        return torch.cat(out)  # (N, C)

    def _policy_logps(self, model, batch: dict, entropy: bool = False):
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + C)
        attention = torch.cat([batch["prompt_mask"], batch["completion_attention"]], dim=1)
        return completion_logprobs(model, input_ids, attention, batch["completion_ids"].shape[1],
                                   temperature=self.args.temperature, entropy=entropy)

    # ----- loss -----
    def _loss_settings(self) -> LossSettings:
        args = self.args
        return LossSettings(loss_type=args.loss_type, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_upper,
                            beta=args.beta, importance_sampling_level=args.importance_sampling_level,
                            delta=getattr(args, "delta", None),  # getattr: fields TRL 1.15 (the GPU machine's) lacks
                            use_bias_correction_kl=getattr(args, "use_bias_correction_kl", False),
                            max_completion_length=args.max_completion_length,
                            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
                            steps_per_generation=args.steps_per_generation,
                            num_processes=self.accelerator.num_processes)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GRPOTrainer.compute_loss has no outputs to return")
        logps, entropies = self._policy_logps(model, inputs, entropy=True)
        settings = self._loss_settings()
        mask = inputs["loss_mask"]
        out = grpo_loss(logps, inputs.get("old_logps"), inputs["advantages"], mask, settings,
                        ref_logps=inputs.get("ref_logps"), num_items_in_batch=inputs["num_items"])
        fmask = mask.float()
        if out.per_token_kl is not None:
            self._metrics["kl"].append(masked_mean(out.per_token_kl.detach(), fmask).item())
        if entropies is not None:
            self._metrics["entropy"].append(masked_mean(entropies, fmask).item())
        for key, value in clip_fractions(out.ratio.detach(), inputs["advantages"], fmask, settings).items():
            self._metrics[key].append(value)
        return out.loss

    # ----- reporting -----
    def _record_batch_metrics(self, scores, names, rewards, zero_std, completion_lists, finished, nan_counts):
        m = self._metrics
        for j, name in enumerate(names):
            column = scores[:, j]
            if not torch.isnan(column).all():
                m[f"rewards/{name}/mean"].append(torch.nanmean(column).item())
                m[f"rewards/{name}/std"].append(nanstd(column).item())
            m[f"rewards/{name}/nan"].append(float(nan_counts.get(name, 0)))
        m["reward"].append(torch.nanmean(rewards).item())
        groups = rewards.view(-1, self.num_generations)
        m["reward_std"].append(torch.nanmean(nanstd(groups, dim=1)).item())
        m["frac_reward_zero_std"].append(zero_std.float().mean().item())
        lengths = torch.tensor([len(c) for c in completion_lists], dtype=torch.float32)
        m["completions/mean_length"].append(lengths.mean().item())
        m["completions/min_length"].append(lengths.min().item())
        m["completions/max_length"].append(lengths.max().item())
        m["completions/clipped_ratio"].append(1.0 - finished.float().mean().item())
        m["prompts/truncated"].append(float(self._truncated_prompts))

    def _maybe_print_samples(self, step, prompts, texts, rewards, scores, names):
        args = self.args
        every = args.sample_completions_steps or (args.logging_steps if args.log_completions else 0)
        if not every or step % int(every) and step != 1 or not self.is_world_process_zero():
            return
        count = args.num_completions_to_print or 2
        lines = [f"velotune: sample completions at step {step}"]
        for i in range(min(count, len(texts))):
            prompt = prompts[i] if isinstance(prompts[i], str) else prompts[i][-1].get("content", "")
            each = ", ".join(f"{n}={scores[i, j].item():.2f}" for j, n in enumerate(names))
            lines.append(f"--- prompt: {str(prompt)[-200:]!r}\n    completion: {texts[i][:500]!r}\n    reward "
                         f"{rewards[i].item():.3f} ({each})")
        logger.info("\n".join(lines))

    def log(self, logs, start_time=None):
        if self.model.training and "loss" in logs:
            for key, values in self._metrics.items():
                if values:
                    logs[key] = (values[-1] if key == "prompts/truncated" else sum(values) / len(values))
            self._metrics.clear()
            logs["peak_memory_gb"] = round(peak_memory_bytes(self.args.device) / 1024 ** 3, 3)
        return super().log(logs, start_time) if start_time is not None else super().log(logs)
