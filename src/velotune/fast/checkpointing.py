"""Per-layer gradient checkpointing: the layer input kept on the GPU, or offloaded ("unsloth").

Checkpointing keeps each decoder layer's input (B, T, C) and recomputes the layer in backward; at
long sequences those inputs are most of what is left in memory (32 layers x T x 4096 x 2 bytes for
an 8B model). `use_gradient_checkpointing="unsloth"` copies each input to pinned CPU memory on a
side CUDA stream while the next layers compute, and brings it back when that layer's backward
needs it. Below `OFFLOAD_MIN_TOKENS` tokens per micro-batch (and off CUDA) the step's plan
(plan.py) keeps the input on the device instead; so does `use_gradient_checkpointing=True`.

The checkpoint is a reentrant-style autograd function (`LayerCheckpointer`): the layer runs under
no_grad in forward and again with grad in backward, where `torch.autograd.backward` accumulates the
layer's parameter gradients. On the fast path that beats torch's checkpoint even with the input kept
on the GPU: the recomputation knows it is one and skips the MLP's forward matmul
(plan.StepPlan.recompute), the random state is saved only where a layer draws random numbers, and
small layers replay as CUDA graphs (layer_graphs.py, through `_GraphedCheckpointFunction`, which
returns the parameters' gradients to autograd). Like every reentrant checkpoint, it supports
`loss.backward()` (what trainers call), not `torch.autograd.grad` on the parameters, and not DDP's
`find_unused_parameters=True`: there the plan uses torch's non-reentrant checkpoint
(RuntimeSettings.torch_checkpoint), as it does off the fast path.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# Offload from this many tokens per micro-batch (B*T). Measured on the H200 (BENCHMARKS.md): at 1,024 tokens (8B
# QLoRA, batch 1, bench/bench_train.py) the offloading function ran 1.49x faster than torch's checkpoint at the same
# peak (6.96 vs 6.94 GiB), at 16,384 tokens 1.05x faster in 3.9 GiB less: its recomputation skips the MLP's forward
# matmul (plan.StepPlan.recompute). Below, the input stays on the device (plan mode "keep"): session 14 measured
# Qwen2.5-VL-7B QLoRA at 844 tokens a micro-batch (bench_vision.py, one call) offloaded at 1,336.5 tokens/s and
# 7.60 GiB, kept at 1,440.6 and 7.61 GiB: 7% slower for no lower peak (the step's peak is in backward, after the
# first layers' inputs are freed).
OFFLOAD_MIN_TOKENS = 1024

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def plain_checkpoint(function, *args, **kwargs):
    """Non-reentrant torch checkpointing (frozen embeddings need no input-grad hooks)."""
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


# Pinned host buffers are cut into pieces whose sizes are powers of two (the last one the
# remainder below this many elements): PyTorch's pinned-memory cache rounds every allocation up to
# a power of two, so one 2.8 GB layer input (344K tokens x 4096 x bf16) would take 4 GiB, and 32
# layers would need 128 GiB of host memory instead of 88 GB.
MIN_PIECE = 1 << 20


def piece_lengths(n: int) -> list[int]:
    """n elements -> lengths of consecutive pieces: powers of two >= MIN_PIECE, then the rest."""
    lengths = []
    while n >= MIN_PIECE:
        lengths.append(1 << (n.bit_length() - 1))
        n -= lengths[-1]
    return lengths + ([n] if n else [])


class _HostCopy:
    """A tensor's copy off the compute device, started asynchronously, brought back on demand.

    CUDA: pinned host memory (in power-of-two pieces, see MIN_PIECE), copied on a side stream that
    first waits for the producer; the source's memory is not reused before the copy ends
    (record_stream). Backward visits the layers in reverse, so restoring one copy starts bringing
    back the one saved before it (`previous`, a weak reference: a graph that is never
    backpropagated frees its copies) on the side stream, overlapping that transfer with this
    layer's recomputation. CPU tensors (tests): plain clones of the same pieces, so the same
    save/restore round trip runs without a GPU.
    """

    def __init__(self, tensor: torch.Tensor, previous: "_HostCopy | None" = None):
        self.device, self.shape, self.dtype = tensor.device, tensor.shape, tensor.dtype
        self.event = None
        self.previous = weakref.ref(previous) if previous is not None else None
        self.prefetched: torch.Tensor | None = None
        self.ready = None
        flat = tensor.detach().contiguous().view(-1)  # (n,)
        starts = [0]
        for length in piece_lengths(flat.numel()):
            starts.append(starts[-1] + length)
        self.slices = [slice(a, b) for a, b in zip(starts, starts[1:])]
        if not tensor.is_cuda:
            self.pieces = [flat[s].clone() for s in self.slices]
            return
        stream = _side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        self.pieces = [torch.empty(s.stop - s.start, dtype=tensor.dtype, pin_memory=True) for s in self.slices]
        with torch.cuda.stream(stream):
            for piece, s in zip(self.pieces, self.slices):
                piece.copy_(flat[s], non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        flat.record_stream(stream)

    def _to_device(self) -> torch.Tensor:
        """The pieces back into one tensor of the original shape (asynchronous on CUDA)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        flat = out.view(-1)
        for piece, s in zip(self.pieces, self.slices):
            flat[s].copy_(piece, non_blocking=True)
        return out

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream (after the device-to-host one)."""
        if self.event is None or self.prefetched is not None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.event)
            self.prefetched = self._to_device()
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def restore(self) -> torch.Tensor:
        previous = self.previous() if self.previous is not None else None
        if self.event is None:
            return self._to_device()
        current = torch.cuda.current_stream(self.device)
        if self.prefetched is not None:
            current.wait_event(self.ready)
            tensor, self.prefetched = self.prefetched, None
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        else:
            current.wait_event(self.event)
            tensor = self._to_device()
        if previous is not None:
            previous.prefetch()
        return tensor


def _backward_once(ctx) -> "_HostCopy | _KeptInput":
    """The saved input, for the one backward a checkpointed layer supports: the layer is recomputed from it once
    and it is freed, so a second backward through the same forward (retain_graph) finds nothing, and a backward
    that builds a graph (create_graph: second-order gradients) would differentiate a recomputation that autograd
    never recorded. Both are refused by name instead of failing obscurely or giving gradients that cannot be
    differentiated further."""
    saved = getattr(ctx, "saved", None)
    if saved is None or torch.is_grad_enabled():
        raise RuntimeError(
            "velotune's layer checkpoint (use_gradient_checkpointing=True or \"unsloth\" on the fast path) recomputes "
            "each layer once, in the first backward: a second backward through the same forward (retain_graph) and "
            "backward with create_graph=True are not supported. Run the model again for each backward, or set "
            "use_gradient_checkpointing=False")
    del ctx.saved
    return saved


class _KeptInput:
    """A layer input kept where it is (no offloading): `restore` hands it back as it was.

    It is held by reference, not through `save_for_backward`, so autograd would not notice an in-place
    change after the forward; the version counter (which `detach` shares) stands in for that check."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.tensor = tensor.detach()
        self.version = tensor._version

    def prefetch(self) -> None:
        pass

    def restore(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError("a checkpointed decoder layer's input was modified in place after the layer's forward; "
                               "its recomputation would use the changed values. Modify a clone instead, or train "
                               "without use_gradient_checkpointing")
        return self.tensor


@dataclass
class _Link:
    """Between consecutive checkpointed layers: the host copy before (to prefetch) and the saved input
    of this layer; whether it is offloaded; whether the recomputation must replay the forward's random
    numbers (dropout)."""

    previous: _HostCopy | None
    preserve_rng_state: bool = True
    offload: bool = True
    copy: _HostCopy | _KeptInput | None = None

    def save(self, hidden: torch.Tensor) -> _HostCopy | _KeptInput:
        self.copy = _HostCopy(hidden, self.previous) if self.offload else _KeptInput(hidden)
        return self.copy


class _CheckpointFunction(torch.autograd.Function):
    """forward(functions, hidden, anchor, link, *args) = functions[0](hidden, *args), keeping only
    `hidden` (a host copy when offloading: `link` passes in the previous layer's copy and hands back this one);
    backward re-runs functions[1] (the layer told it is a recomputation) at the restored input.
    `anchor` is an empty tensor that requires grad, so that backward runs (and the layer's
    adapters get gradients) even when `hidden` itself needs no gradient (layer 0 with frozen
    embeddings)."""

    @staticmethod
    def forward(ctx, functions, hidden, anchor, link, *args):
        function, ctx.recompute = functions
        ctx.args = args
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state() if link.preserve_rng_state else None
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda and ctx.cpu_rng is not None else None
        ctx.saved = link.save(hidden)
        with torch.no_grad():
            return function(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = _backward_once(ctx).restore().detach().requires_grad_(ctx.hidden_requires_grad)
        devices = [hidden.device] if hidden.is_cuda else []
        enabled, dtype = ctx.autocast
        preserve = ctx.cpu_rng is not None
        with torch.random.fork_rng(devices=devices, enabled=preserve), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            if preserve:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            out = ctx.recompute(hidden, *ctx.args)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return (None, grad_hidden, None, None, *([None] * len(ctx.args)))


class _GraphedCheckpointFunction(torch.autograd.Function):
    """The checkpoint of a layer run through CUDA graphs (layer_graphs.py):
    forward(run, hidden, link, *params) = run.forward(hidden), keeping `hidden` (or its host copy);
    backward replays the recomputation and backward, and returns the gradients of `hidden` and of
    the layer's trainable `params` (autograd accumulates those into `.grad`)."""

    @staticmethod
    def forward(ctx, run, hidden, link, *params):
        ctx.run = run
        ctx.saved = link.save(hidden)
        return run.forward(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = _backward_once(ctx).restore()
        grad_hidden, grads = ctx.run.backward(hidden, grad_out)
        return (None, grad_hidden, None, *grads)


class LayerCheckpointer:
    """Runs one model call's layer checkpoints (the plan's checkpoint modes "offload" and "keep").

    `__call__(function, hidden, *args, recompute=..., preserve_rng_state=..., graphed=..., offload=...)`
    is function(hidden, *args) keeping only `hidden`, in a host copy when `offload`, else on its
    device; backward calls `recompute` (the same layer, told by its plan that it is a recomputation)
    at the restored input. Whether a call offloads is the plan's decision (plan.plan_step: the mode,
    the threshold, the device), not this object's. `preserve_rng_state=False` skips saving and
    replaying the random-number state, for a layer that draws none (no dropout); that round trip
    costs host time on every layer of a host-bound step. `graphed`: a layer_graphs.LayerRun, which
    then runs the layer (CUDA graphs; `function` and `args` are not called). It remembers the
    previous layer's host copy, so backward can prefetch it; `offloaded` and `kept` count the calls.
    """

    def __init__(self):
        self.offloaded = self.kept = 0
        self._last_copy: weakref.ref | None = None  # the host copy of the previous layer's input

    def __call__(self, function, hidden: torch.Tensor, *args, recompute=None, preserve_rng_state: bool = True,
                 graphed=None, offload: bool = True):  # fmt: skip
        previous = self._last_copy() if self._last_copy is not None and offload else None
        if previous is not None and previous.device != hidden.device:
            previous = None
        link = _Link(previous, preserve_rng_state, offload)
        if graphed is not None:
            out = _GraphedCheckpointFunction.apply(graphed, hidden, link, *graphed.params)
        else:
            anchor = torch.empty(0, device=hidden.device, requires_grad=True)
            functions = (function, recompute or function)
            out = _CheckpointFunction.apply(functions, hidden, anchor, link, *args)
        if offload:
            self.offloaded += 1
            self._last_copy = weakref.ref(link.copy)
        else:
            self.kept += 1
        return out
