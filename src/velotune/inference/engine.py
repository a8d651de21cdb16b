"""The generation loop: prefill once per prompt, decode every sample in lockstep, stop per sequence.

Layout: the prompts are left-padded to one length P and prefilled into cache rows [0, prompts);
those rows are then copied to the n rows of their samples (one prefill per prompt, however many
samples). Decode step t writes every row's token at slot P + t. When sequences finish, the
living rows are moved to the front once the batch fits a smaller bucket (powers of two), so
finished sequences stop costing compute; on CUDA each bucket's step is one CUDA graph.

Per step the host reads the sampled tokens back (one small copy) to apply the stopping rules
(EOS, stop token ids, stop strings, max_tokens) and to stream; the logits, penalties and
sampling stay on the device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..fast.host_embedding import keep_on_device
from ..fast.plan import StepPlan, find_decoder, log_once, plan_step
from ..fast.stacked_adapters import refresh_adapters, with_stacked_adapters
from ..quant.int8 import is_linear8bit
from .cache import InferenceSettings, StaticKVCache
from .runner import DecodeGraphs, DecoderRunner
from .sampling import SamplingParams, chosen_logprobs, sample


# Tokens per prefill chunk (rows are prefilled in groups of about this many tokens).
PREFILL_TOKENS = 8192
# Cache lengths are rounded up to this on CUDA, so later calls reuse the cache and its graphs.
LENGTH_QUANTUM = 128
# Decode steps read the LoRA adapters from persistent buffers stacked once per call (fast/stacked_adapters.py);
# False: every step stacks and casts them, as before (module-level so bench_grpo.py can compare the two).
STACK_ADAPTERS = True


@dataclass
class Sequence:
    """One completion as it is generated."""

    prompt: int
    index: int
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def take(self, index: int, token: int, logprob: float | None, stopper: "StopChecker", on_token=None) -> bool:
        """Append one sampled token (and its log-probability), stream it as sequence `index`, apply
        the stopping rules; True while the sequence goes on."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if on_token is not None:
            on_token(index, token)
        stopper.finish(self)
        return self.finish_reason is None


def note_sampled(tokens: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None) -> None:
    """Record `tokens` (b,) in the first b rows of the penalties' seen mask and counts (b, V)."""
    b = tokens.shape[0]
    if seen is not None:
        seen[:b].scatter_(1, tokens[:, None], True)
    if counts is not None:
        counts[:b].scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=counts.dtype))


def base_model(model):
    """The causal LM under a PEFT wrapper (PEFT's LoRA layers live inside it)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def unserved(causal) -> str | None:
    """Why the engine cannot run `causal` (a model whose decoder is ours), or None. Decoders with borrowed layers
    (transformers' own modules among ours: Mllama's cross-attention into the image, decoder.py) are not served: the
    static cache holds self-attention keys only, and the runner calls our layers alone."""
    decoder = find_decoder(causal)
    if decoder is not None and decoder.borrowed_layers:
        return (f"its decoder's layers {sorted(decoder.borrowed_layers)} are transformers' cross-attention layers, "
                "which the engine's static cache and runner do not run")
    return None


def context_limit(causal) -> int:
    """The longest sequence the engine generates: the model's max_seq_length (from_pretrained), else its config's."""
    limit = getattr(causal, "max_seq_length", None)
    return int(limit or getattr(causal.config, "max_position_embeddings", None) or 2048)


def settings_of(model) -> InferenceSettings:
    """from_pretrained's inference settings, held by the engine object it attaches (api.GenerationEngine)."""
    attached = getattr(base_model(model), "generation_engine", None)
    return getattr(attached, "settings", None) or InferenceSettings()


def check_prompts(prompts, params: SamplingParams, limit: int, vocab: int) -> list[list[int]]:
    """Token-id prompts validated; too long: truncated only with truncate_prompt_tokens, else ValueError."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt {i} must be a non-empty list of token ids (ints), got {type(prompt).__name__}")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        prompt = list(prompt)
        if params.truncate_prompt_tokens is not None:
            prompt = prompt[-params.truncate_prompt_tokens:]
        if len(prompt) >= limit:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens but the model's context is {limit} tokens "
                             f"(max_seq_length), leaving no room for new tokens; shorten it, pass "
                             f"SamplingParams(truncate_prompt_tokens=...) to keep its last tokens, or load the model "
                             f"with a larger max_seq_length")
        checked.append(prompt)
    return checked


@contextlib.contextmanager
def eval_mode(model):
    """Evaluation mode for the duration (no LoRA or attention dropout while generating), then each
    module's own mode back (GRPO generates from a model in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _bucket(m: int, rows: int) -> int:
    b = 1
    while b < m:
        b *= 2
    return min(b, rows)


def _weights_signature(causal) -> tuple:
    """What captured graphs depend on: every tensor's storage, and which adapters run."""
    ptrs = tuple(p.data_ptr() for p in causal.parameters())
    flags = tuple((tuple(getattr(m, "active_adapters", ())), bool(getattr(m, "disable_adapters", False)),
                   bool(getattr(m, "merged", False)))
                  for m in causal.modules() if hasattr(m, "lora_A"))
    return ptrs, flags


class _Resident:
    """The cache and graphs kept with a model between calls (repeated GRPO generations reuse them).

    Held by the model's engine object (`model.generation_engine.resident`, api.GenerationEngine),
    so they live and die with the model; a model without one allocates per call. The graphs' runner
    holds the plan whose layers carry the LoRA adapters stacked in the model's dtype
    (fast/stacked_adapters.py): kept with the graphs, which read them, refreshed at the start of
    every call (`_resident`), given back with the cache by `release`."""

    def __init__(self, cache: StaticKVCache, graphs: DecodeGraphs, valid: torch.Tensor, signature: tuple):
        self.cache, self.graphs, self.valid, self.signature = cache, graphs, valid, signature


def _holder(model):
    return getattr(base_model(model), "generation_engine", None)


def resident_of(model) -> _Resident | None:
    """The cache and graphs kept for `model`, if any."""
    return getattr(_holder(model), "resident", None)


def release(model) -> None:
    """Free the KV cache and CUDA graphs kept for `model` (training needs the memory back)."""
    holder = _holder(model)
    if holder is not None:
        holder.resident = None


def _resident(runner: DecoderRunner, rows: int, length: int, dtype, device, settings: InferenceSettings,
              graphable: bool) -> _Resident:
    holder = _holder(runner.causal)
    signature = _weights_signature(runner.causal)
    old = getattr(holder, "resident", None)
    fp8 = settings.float8_kv_cache
    if old is not None and old.cache.fits(rows, length, dtype, fp8):
        old_plan = old.graphs.runner.plan
        same_plan = (old_plan.fast, old_plan.gemv_rows) == (runner.plan.fast, runner.plan.gemv_rows)
        if old.signature != signature or not same_plan or old.graphs.use_graphs != (graphable and device.type == "cuda"):
            old.graphs = None  # the old graphs' adapter buffers go before the new ones are made
            old.graphs = DecodeGraphs(_with_adapters(runner, dtype), old.cache, old.valid, graphable)
            old.signature = signature
        else:
            # The same buffers (captured graphs read them) get the adapters' values of now: the trainer
            # changed them in place since the last call, unseen by any version counter.
            refresh_adapters(old.graphs.runner.plan)
        return old
    if holder is not None:
        holder.resident = None  # free the old buffers before allocating larger ones
    if device.type == "cuda":
        length = -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM
        rows = _bucket(rows, 1 << 30)
    cache = StaticKVCache(runner.kv_shapes(), rows, length, dtype, device, fp8, settings.gpu_memory_utilization)
    valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
    resident = _Resident(cache, DecodeGraphs(_with_adapters(runner, dtype), cache, valid, graphable), valid, signature)
    if holder is not None:
        holder.resident = resident
    return resident


def _with_adapters(runner: DecoderRunner, dtype) -> DecoderRunner:
    """A runner like `runner` whose plan's layers carry their LoRA adapters stacked in `dtype`, in
    buffers made now (fast/stacked_adapters.py): decode steps read those instead of stacking and
    casting the adapters again on every step."""
    if not STACK_ADAPTERS:
        return runner
    return DecoderRunner(runner.causal, runner.decoder, with_stacked_adapters(runner.plan, dtype))


class StopChecker:
    """Per-sequence stopping: EOS, stop token ids, stop strings, max_tokens, min_tokens."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], tokenizer):
        self.params, self.tokenizer = params, tokenizer
        self.eos = set() if params.ignore_eos else set(eos_ids)
        self.stop_ids = set(params.stop_token_ids)
        if params.stop and tokenizer is None:
            raise ValueError(f"SamplingParams(stop={params.stop!r}) needs the tokenizer to match text; pass tokenizer=")
        self.tail = max((len(s) for s in params.stop), default=0) + 4  # tokens decoded to find a stop string

    def finish(self, seq: Sequence) -> None:
        token, count = seq.tokens[-1], len(seq.tokens)
        if count >= self.params.min_tokens:
            if token in self.eos:
                seq.finish_reason = "stop"
                return
            if token in self.stop_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            if self.params.stop:
                text = self.tokenizer.decode(seq.tokens[-self.tail:], skip_special_tokens=self.params.skip_special_tokens)
                hit = next((s for s in self.params.stop if s in text), None)
                if hit is not None:
                    seq.finish_reason, seq.stop_reason = "stop", hit
                    return
        if count >= seq.max_new:
            seq.finish_reason = "length"


def generate(model, prompts: list[list[int]], params: SamplingParams, eos_ids: set[int], tokenizer=None,
             on_token=None, use_graphs: bool = True, limit: int | None = None, prefill_inputs=None) -> list[Sequence]:
    """Completions (prompt-major: prompt 0's n samples first) of our decoder for token-id prompts.

    `on_token(sequence_number, token_id)` is called for every new token (streaming); `limit`:
    the longest sequence allowed (default: the model's context, `context_limit`).
    `prefill_inputs(ids, real)`, for a vision-language model whose language model is our decoder:
    given the left-padded prompts (count, P) and their real-token map, it returns the prefill's input
    embeddings (count, P, C) with the image features in place, its position ids ((count, P), or
    (3, count, P) for M-RoPE) and each row's next position (count,); decode steps are text only."""
    causal = base_model(model)
    decoder = find_decoder(causal)
    if decoder is not None:
        keep_on_device(decoder)
    why = unserved(causal)
    if why is not None:
        log_once(f"velotune: generation runs the generic loop over the model's forward, not the engine: {why}")
    if decoder is None or why is not None:
        from .generic import generate as generic_generate

        return generic_generate(model, prompts, params, eos_ids, tokenizer, on_token, limit)
    limit = limit or context_limit(causal)
    prompts = check_prompts(prompts, params, limit, decoder.config.vocab_size)
    runner = DecoderRunner(causal, decoder, _plan(decoder, len(prompts) * params.n))
    graphable = use_graphs and _graph_safe(decoder)
    device, dtype = decoder.embed_tokens.weight.device, decoder.embed_tokens.weight.dtype
    n, count = params.n, len(prompts)
    rows = count * n
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    budget = [min(params.max_tokens or limit, limit - length) for length in lengths]
    seqs = [Sequence(i // n, i % n, budget[i // n], logprobs=[] if params.logprobs is not None else None)
            for i in range(rows)]
    with eval_mode(model), torch.no_grad():
        resident = _resident(runner, rows, P + max(budget), dtype, device, settings_of(model), graphable)
        cache, valid, graphs = resident.cache, resident.valid, resident.graphs
        runner = graphs.runner  # its plan holds the adapters' buffers of this call (prefill reads them too)
        logits, next_positions = _prefill(runner, cache, valid, prompts, P, device, prefill_inputs)  # (count, V)
        expand = torch.arange(rows, device=device) // n
        if n > 1:
            cache.gather_rows(expand)
            valid[:rows] = valid[expand]
            logits = logits.index_select(0, expand)  # (rows, V): each sample draws on its own
        valid[:, P:] = True  # generated slots; the mask hides those past the current step
        positions = next_positions.index_select(0, expand)  # (rows,) next position
        seen = counts = None
        if params.needs_seen:
            seen = torch.zeros(rows, logits.shape[-1], dtype=torch.bool, device=device)
            for i, prompt in enumerate(prompts):
                seen[i * n:(i + 1) * n, torch.tensor(prompt, device=device)] = True
        if params.needs_counts:
            counts = torch.zeros(rows, logits.shape[-1], dtype=torch.int32, device=device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stopper = StopChecker(params, eos_ids, tokenizer)
        layout: list[int | None] = list(range(rows))  # sequence in each cache row
        b, step = rows, 0
        refill_at = _longrope_switch(decoder)
        # Run one step ahead: the next decode step is launched before the host reads this step's
        # tokens, so the host's bookkeeping overlaps the GPU (a finished row costs one extra step).
        ahead = refill_at is None
        suppress = sorted(stopper.eos | stopper.stop_ids)
        host = _HostCopy(rows, device)

        def decode(tokens, positions):
            graphs.ids[:b, 0].copy_(tokens[:b])
            graphs.positions[:b, 0].copy_(positions[:b])
            graphs.slot.fill_(P + step)
            return graphs.run(b)

        while True:
            allowed = _before_min_tokens(logits, params, step, suppress)
            tokens = sample(allowed, params, generator, None if seen is None else seen[:b],
                            None if counts is None else counts[:b])  # (b,)
            logps = chosen_logprobs(logits, tokens) if params.logprobs is not None else None
            note_sampled(tokens, seen, counts)
            host.start(tokens, logps)
            if ahead:
                logits = decode(tokens, positions)
                positions, step = positions + 1, step + 1
            host_tokens, host_logps = host.wait()
            alive = []
            for row, (s, token) in enumerate(zip(layout, host_tokens)):
                if s is None or seqs[s].finish_reason is not None:
                    continue
                if seqs[s].take(s, token, None if host_logps is None else host_logps[row], stopper, on_token):
                    alive.append(row)
            if not alive:
                break
            smaller = _bucket(len(alive), rows)
            if smaller < b:
                order = torch.tensor(alive + [alive[0]] * (smaller - len(alive)), device=device)
                cache.gather_rows(order)
                valid[:smaller] = valid.index_select(0, order)
                tokens, positions = tokens.index_select(0, order), positions.index_select(0, order)
                logits = logits.index_select(0, order) if ahead else logits
                seen = None if seen is None else seen.index_select(0, order)
                counts = None if counts is None else counts.index_select(0, order)
                layout = [layout[r] for r in alive] + [None] * (smaller - len(alive))
                b = smaller
            if not ahead:
                if P + step == refill_at:
                    logits = _refill(runner, cache, valid, prompts, seqs, layout, P, device)
                else:
                    logits = decode(tokens, positions)
                positions, step = positions + 1, step + 1
    return seqs


def _before_min_tokens(logits: torch.Tensor, params: SamplingParams, step: int, stop_ids: list[int]) -> torch.Tensor:
    """The logits to sample from: EOS and stop tokens banned until min_tokens are out (a copy, so
    the log-probabilities still come from the model's own logits)."""
    if not (params.min_tokens and step < params.min_tokens and stop_ids):
        return logits
    banned = logits.clone()
    banned[:, stop_ids] = float("-inf")
    return banned


class _HostCopy:
    """The sampled tokens (and log-probabilities) copied to the host without waiting for work queued after them."""

    def __init__(self, rows: int, device: torch.device):
        self.cuda = device.type == "cuda"
        pin = self.cuda
        self.tokens = torch.empty(rows, dtype=torch.long, pin_memory=pin)
        self.logps = torch.empty(rows, dtype=torch.float32, pin_memory=pin)
        self.event = torch.cuda.Event() if self.cuda else None
        self.count, self.with_logps = 0, False

    def start(self, tokens: torch.Tensor, logps: torch.Tensor | None) -> None:
        self.count, self.with_logps = tokens.shape[0], logps is not None
        self.tokens[:self.count].copy_(tokens, non_blocking=self.cuda)
        if logps is not None:
            self.logps[:self.count].copy_(logps, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def wait(self) -> tuple[list[int], list[float] | None]:
        if self.cuda:
            self.event.synchronize()
        logps = self.logps[:self.count].tolist() if self.with_logps else None
        return self.tokens[:self.count].tolist(), logps


def _prefill(runner: DecoderRunner, cache: StaticKVCache, valid: torch.Tensor, prompts: list[list[int]], P: int,
             device, prefill_inputs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to P, in groups of rows of about PREFILL_TOKENS tokens -> last logits (count, V)
    and each row's next position (count,)."""
    count = len(prompts)
    ids = torch.zeros(count, P, dtype=torch.long)
    real = torch.zeros(count, P, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, P - len(prompt):] = torch.tensor(prompt)
        real[i, P - len(prompt):] = True
    ids, real = ids.to(device), real.to(device)
    valid[:count, :P] = real
    valid[:count, P:] = False
    embeds = None
    if prefill_inputs is None:
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (count, P): real tokens count from 0
        next_positions = real.sum(-1)  # (count,)
    else:
        embeds, positions, next_positions = prefill_inputs(ids, real)  # (count, P, C), (count|3, ..., P), (count,)
    group = max(1, PREFILL_TOKENS // P)
    logits = []
    for start in range(0, count, group):
        stop = min(count, start + group)
        rows = embeds[start:stop] if embeds is not None else None
        logits.append(runner.prefill(cache, ids[start:stop], positions[..., start:stop, :], real[start:stop], start,
                                     embeds=rows))
    return torch.cat(logits), next_positions.to(device)


def _graph_safe(decoder) -> bool:
    """Whether a decode step can be captured as a CUDA graph: not with RoPE tables that change with the
    length (dynamic, longrope), nor with bitsandbytes int8 layers (their matmul asks the host whether any
    activation is an outlier, a sync that capture forbids)."""
    if any(r.rope_type in ("dynamic", "longrope") for r in decoder.rotary_emb.values()):
        return False
    return not any(is_linear8bit(m) for m in decoder.modules())


def _plan(decoder, rows: int) -> StepPlan:
    """The fast path's plan for this generation (a cached no-grad call): on it, decode steps of up
    to `plan.gemv_rows` rows run their projections through the small-batch GEMV kernels, dense and
    NF4 (fast/decode_linear.py); 4-bit models no longer need bitsandbytes' own GEMV on the plain
    path at batch 1 (141 tokens/s there, BENCHMARKS.md). `rows` is kept for callers' clarity."""
    return plan_step(decoder, cache=True)


def _longrope_switch(decoder) -> int | None:
    """LongRoPE moves every position to its long factors once the sequence passes the original
    length: keys cached before are stale then. The cache length at which to recompute them all
    (as transformers' Phi-3 and our model's generate do), or None for other rope types."""
    for rope in decoder.rotary_emb.values():
        if rope.rope_type == "longrope":
            return rope.params.get("original_max_position_embeddings", decoder.config.max_position_embeddings)
    return None


def _refill(runner, cache, valid, prompts, seqs, layout, P, device) -> torch.Tensor:
    """Prefill every row again over its prompt and the tokens generated so far -> logits (b, V)."""
    rows = [prompts[seqs[s].prompt] if s is not None else [0] for s in layout]
    tails = [seqs[s].tokens if s is not None else [] for s in layout]
    T = P + max(len(t) for t in tails)
    ids = torch.zeros(len(layout), T, dtype=torch.long)
    for r, (prompt, tail) in enumerate(zip(rows, tails)):
        ids[r, P - len(prompt):P] = torch.tensor(prompt)
        ids[r, P:P + len(tail)] = torch.tensor(tail, dtype=torch.long)
    ids = ids.to(device)
    real = valid[:len(layout), :T]
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return runner.prefill(cache, ids, positions, real, 0)
