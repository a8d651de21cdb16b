"""CUDA graphs of the checkpointed decoder layers: each layer's no-grad forward, and its
recomputation together with its backward, replayed by one call each.

Why: on a small model the fast path's training step is bound by the host, not the GPU (BENCHMARKS.md:
a Llama-3.2-1B step held about 0.3 s of GPU work in 0.48 s). Under velotune's checkpoint
(fast/checkpointing.py, the input offloaded or kept) every layer runs twice per micro-batch, forward
and recomputation + backward, which is a few hundred PyTorch calls and Triton launches per layer
whose host cost is larger than their GPU time. A captured graph replays the same kernels on the
same memory without any of that Python.

When (`ModelGraphs.begin` and `LayerMasks.graphable` decide): the fast path is on, on CUDA, the
layer goes through velotune's checkpoint, its input is small enough that launching its kernels
takes longer than running them (plan.MAX_GRAPHED_ELEMENTS), nothing draws random numbers (no attention dropout),
no KV cache, and the same shapes come back: the first call of a
shape runs eagerly (Triton compiles, cuBLAS picks its kernels: neither may happen during capture),
the second captures, later ones replay. Padding, packing and sliding-window masks are tensors built per
batch: the graphs read them from a buffer of the shape's, into which each forward's mask is copied
before a replay, as the RoPE tables are (`StaticMasks`; a padded vision batch, whose 32 text layers
ran eagerly before, BENCHMARKS.md session 20). `VELOTUNE_CUDA_GRAPHS=0` turns graphs off. The step's
plan (plan.py, `StepPlan.graphs`) makes every decision that does not depend on the batch's masks.

Exactness: a replay launches the kernels the eager call launched, on the same inputs, so it gives
the same values. A graph also bakes in every address it read: the layer's weights, adapters and
biases (by identity and data pointer), its trainable parameters, the shapes and the autocast
state form each layer's key, and any change means an eager call, then a new capture.

Memory: all graphs of a model share one memory pool. Each graph's intermediates are dead when it
ends, so the pool holds about one layer's working memory. The graphs read their inputs from, and
write their outputs to, buffers shared by every layer of one shape (`_Buffers`: the layer input,
its output or input gradient, the output gradient, RoPE tables, the parameter gradients): the
caller's tensors are copied in, and results cloned out, so what a caller holds is never
overwritten by a later replay. Shape sets are capped (`MAX_SHAPES`, least recently used dropped);
when shapes keep changing, capturing stops after `MAX_CAPTURED_SHAPES` shapes and everything
runs eagerly (padding batches to a few fixed lengths brings the graphs back).

Gradients: the backward graph computes the gradients of the layer input and of the layer's
trainable parameters with `torch.autograd.grad`; `_GraphedCheckpointFunction` (checkpointing.py)
returns the parameters' ones as its inputs' gradients, so they reach `.grad` through autograd's
own accumulation (and its hooks, which distributed training relies on).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("velotune")

MAX_SHAPES = 2  # shape sets (buffers + every layer's graphs) kept at once
MAX_CAPTURED_SHAPES = 8  # distinct shapes captured over a model's life before capturing stops
_WARMUP_CALLS = 1  # eager calls of a key before it is captured


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _tensor_key(t: torch.Tensor | None):
    return None if t is None else (id(t), t.data_ptr(), t.dtype, tuple(t.shape))


def adapter_tensors(plan) -> list[torch.Tensor]:
    """A LayerPlan's LoRA A and B tensors, projection by projection."""
    return [t for p in (*plan.qkv, *plan.o, *plan.mlp) for t in (p.lora_A, p.lora_B) if t is not None]


def _with_adapters(plan, replace: dict):
    """LayerPlan `plan` with the adapter tensors in `replace` (id -> tensor) swapped in."""
    def swap(p):
        A, B = replace.get(id(p.lora_A), p.lora_A), replace.get(id(p.lora_B), p.lora_B)
        return dataclasses.replace(p, lora_A=A, lora_B=B)

    return dataclasses.replace(plan, qkv=tuple(map(swap, plan.qkv)), o=tuple(map(swap, plan.o)),
                               mlp=tuple(map(swap, plan.mlp)))


def layer_signature(plan, params: tuple[torch.Tensor, ...]) -> tuple:
    """What a layer's graphs bake in: every projection's weight, bias and adapter tensors (by
    identity and data pointer; `param.data = ...` moves the pointer), scalings, FP8 or not, and the layer's
    trainable parameters. Params4bit's __torch_function__ is bypassed: data_ptr() through it costs
    microseconds, and there are dozens per layer."""
    with torch._C.DisableTorchFunctionSubclass():
        parts = [
            (_tensor_key(p.weight), _tensor_key(p.bias), _tensor_key(p.lora_A), _tensor_key(p.lora_B), p.scaling,
             p.fp8)  # the plan's FP8 choice changes the kernels a graph replays
            for p in (*plan.qkv, *plan.o, *plan.mlp)
        ]
        parts.append(tuple(_tensor_key(t) for t in params))
    return tuple(parts)


@dataclass
class _LayerGraphs:
    """One layer's graphs for one shape set, valid while its signature holds."""

    signature: tuple
    forward: "torch.cuda.CUDAGraph | None" = None
    backward: "torch.cuda.CUDAGraph | None" = None
    forward_calls: int = 0
    backward_calls: int = 0
    grad_views: list = field(default_factory=list)  # per parameter: (flat buffer, slice, shape) or None (unused)


def mask_of(masks) -> torch.Tensor | None:
    """The (B|1, 1, T, T) bool mask a layer's attention reads from `masks` (a LayerMasks without a cache) in a
    training forward, or None for plain causal attention."""
    return masks.for_keys(masks.inputs.q_len)[0]


class StaticMasks:
    """A LayerMasks stand-in for captured layers: every key count reads the one buffer (no cache: the keys are
    the call's tokens), which `_Buffers.masks_for` refreshes before each replay."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # (B|1, 1, T, T) bool
        self.source: torch.Tensor | None = None  # the mask last copied in

    def for_keys(self, k_len: int) -> tuple[torch.Tensor, bool]:
        return self.mask, False


class _Buffers:
    """The tensors every layer's graphs of one shape read and write (allocated outside the pool)."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = torch.empty_like(hidden)  # (B, T, C) the layer's input
        self.out = torch.empty_like(hidden)  # (B, T, C) forward: its output; backward: the input's gradient
        self.grad = torch.empty_like(hidden)  # (B, T, C) the output's gradient
        self.rope: dict[str, tuple] = {}  # layer kind -> (static cos, static sin, the tuple last copied in)
        self.masks: dict[str, StaticMasks] = {}  # layer kind -> its static mask
        self.flats: dict[tuple, torch.Tensor] = {}  # (dtype, numel) -> flat parameter-gradient buffer
        self.layers: dict[int, _LayerGraphs] = {}

    def rope_for(self, kind: str, cos_sin: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (cos, sin) of `kind`, refreshed when `cos_sin` is not the tuple last copied in
        (one new tuple per model forward; the strong reference keeps its identity unambiguous)."""
        entry = self.rope.get(kind)
        if entry is None or any(_layout(a) != _layout(b) for a, b in zip(entry, cos_sin)):
            # First use, or tables of another shape (explicit position ids): the layers' signatures
            # hold that layout, so graphs reading the old tables are captured again.
            entry = (torch.empty_like(cos_sin[0]), torch.empty_like(cos_sin[1]), None)
        if entry[2] is not cos_sin:
            entry[0].copy_(cos_sin[0])
            entry[1].copy_(cos_sin[1])
            entry = self.rope[kind] = (entry[0], entry[1], cos_sin)
        return entry[0], entry[1]

    def masks_for(self, kind: str, masks):
        """`masks` (a LayerMasks) as the graphs of `kind` read them: as they are when they hold no tensor,
        else a StaticMasks whose buffer holds this forward's mask (copied in when `masks` built another)."""
        mask = mask_of(masks)
        if mask is None:
            return masks
        static = self.masks.get(kind)
        if static is None or _layout(static.mask) != _layout(mask):  # the signature holds the layout: recaptured
            static = self.masks[kind] = StaticMasks(torch.empty_like(mask))
        if static.source is not mask:
            static.mask.copy_(mask)
            static.source = mask  # a strong reference: its identity stays unambiguous
        return static

    def flat(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (dtype, numel)
        if key not in self.flats:
            self.flats[key] = torch.empty(numel, dtype=dtype, device=self.hidden.device)
        return self.flats[key]


class ModelGraphs:
    """The CUDA graphs of one decoder's layers (see the module docstring). Not copied with the
    model: a deep copy (TRL's reference model) gets an empty one."""

    def __init__(self):
        self.pool = None
        self.shapes: OrderedDict[tuple, _Buffers] = OrderedDict()
        self.captured_shapes = 0
        self.captures = 0  # graphs captured (tests and logs read these)
        self.replays = 0
        self.failed: str | None = None  # why capturing stopped, once it has
        self._stream = None
        # Tests: run the same code on CPU tensors, every call eagerly (CUDA graphs need CUDA).
        self.cpu_rehearsal = False

    def __deepcopy__(self, memo):
        return ModelGraphs()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def begin(self, hidden: torch.Tensor) -> _Buffers | None:
        """The buffers for this forward's shape (a training forward whose layers are eligible,
        see DecoderModel.forward), or None when it runs eagerly."""
        if not (hidden.is_cuda or self.cpu_rehearsal) or self.failed is not None:
            return None
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():  # the caller captures the whole step
            return None
        key = (tuple(hidden.shape), hidden.dtype, hidden.device, _autocast_state(hidden.device.type))
        buffers = self.shapes.get(key)
        if buffers is not None:
            self.shapes.move_to_end(key)
            return buffers
        if self.captured_shapes >= MAX_CAPTURED_SHAPES:
            self.failed = f"{MAX_CAPTURED_SHAPES} batch shapes captured already; the shapes keep changing"
            self.shapes.clear()  # their buffers and graphs' pool go once no backward holds them
            logger.info("velotune: CUDA graphs off for this model: %s (pad batches to fixed lengths to keep "
                        "them)", self.failed)
            return None
        self.captured_shapes += 1
        while len(self.shapes) >= MAX_SHAPES:
            self.shapes.popitem(last=False)
        buffers = self.shapes[key] = _Buffers(hidden)
        return buffers

    def layer(self, buffers: _Buffers, index: int, layer, plan, kind: str, cos_sin, masks,
              hidden: torch.Tensor) -> "LayerRun | None":  # fmt: skip
        """Layer `index`'s run for this forward under the step's `plan` (its graphs are kept while
        its signature holds), or None when it runs eagerly: a trainable parameter other than the
        plan's adapters (a norm weight) or nothing to differentiate."""
        params = tuple(p for p in layer.parameters() if p.requires_grad)
        adapters = tuple(t for t in adapter_tensors(plan.layer(index)) if t.requires_grad)
        if not (params or hidden.requires_grad) or {id(p) for p in params} != {id(t) for t in adapters}:
            return None
        mask = mask_of(masks)
        signature = (layer_signature(plan.layer(index), adapters), hidden.requires_grad, kind, *map(_layout, cos_sin),
                     None if mask is None else _layout(mask))  # the attention's kernels differ with a mask
        graphs = buffers.layers.get(index)
        if graphs is None or graphs.signature != signature:
            graphs = buffers.layers[index] = _LayerGraphs(signature)
        return LayerRun(self, buffers, graphs, layer, index, plan, adapters, kind, cos_sin, masks,
                        hidden.requires_grad)

    def capture(self, body, what: str) -> "torch.cuda.CUDAGraph | None":
        """`body` recorded into a new graph of the shared pool, or None (capturing stops for this
        model, with the reason logged) when something in it cannot be captured."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self._stream):
                body()
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            self.failed = f"capturing a layer's {what} failed ({type(error).__name__}: {error})"
            self.shapes.clear()
            logger.warning("velotune: CUDA graphs off for this model: %s; training continues eagerly", self.failed,
                           exc_info=True)
            return None
        self.captures += 1
        return graph


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class LayerRun:
    """One layer call under velotune's checkpoint (offloaded or kept): eager, captured or replayed."""

    def __init__(self, owner: ModelGraphs, buffers: _Buffers, graphs: _LayerGraphs, layer, index: int, plan,
                 params, kind, cos_sin, masks, hidden_grad: bool):  # fmt: skip
        self.owner, self.buffers, self.graphs = owner, buffers, graphs
        self.layer, self.index, self.plan, self.params, self.kind = layer, index, plan, params, kind
        self.function = functools.partial(layer.__call__, plan=plan)
        self.recompute = functools.partial(layer.__call__, plan=plan.for_recomputation())
        self.cos_sin, self.masks, self.hidden_grad = cos_sin, masks, hidden_grad
        self.autocast = _autocast_state(buffers.hidden.device.type)  # the recomputation runs under the same

    def _static_args(self):
        """The layer's arguments as its graphs read them, this forward's RoPE tables and mask copied in."""
        return self.buffers.rope_for(self.kind, self.cos_sin), self.buffers.masks_for(self.kind, self.masks), None

    def _eager_args(self):
        """The arguments of an eager call: this forward's own, or in a CPU rehearsal the static buffers a replay
        would read (so tests on the CPU check that each call refreshes them)."""
        return self._static_args() if self.owner.cpu_rehearsal else (self.cos_sin, self.masks, None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output for `hidden` (B, T, C), without autograd."""
        graphs, buffers = self.graphs, self.buffers
        if graphs.forward is None and self.owner.failed is None:
            graphs.forward_calls += 1
            if graphs.forward_calls > _WARMUP_CALLS and hidden.is_cuda:
                args = self._static_args()

                def body():
                    with torch.no_grad():
                        buffers.out.copy_(self.function(buffers.hidden, *args))

                graphs.forward = self.owner.capture(body, "forward")
        if graphs.forward is None or self.owner.failed is not None:
            with torch.no_grad():
                return self.function(hidden, *self._eager_args())
        self._static_args()  # RoPE tables and mask of this forward
        buffers.hidden.copy_(hidden)
        graphs.forward.replay()
        self.owner.replays += 1
        return buffers.out.clone()

    def backward(self, hidden: torch.Tensor, grad_out: torch.Tensor) -> tuple:
        """(gradient of `hidden` or None, [gradient of each parameter or None]) of the layer
        recomputed at `hidden`, given its output's gradient `grad_out`."""
        graphs, buffers = self.graphs, self.buffers
        if graphs.backward is None and self.owner.failed is None:
            graphs.backward_calls += 1
            if graphs.backward_calls > _WARMUP_CALLS and hidden.is_cuda:
                graphs.backward = self._capture_backward()
        if graphs.backward is None or self.owner.failed is not None:
            return self._differentiate(hidden, self._eager_args(), grad_out)
        self._static_args()
        buffers.hidden.copy_(hidden)
        buffers.grad.copy_(grad_out)
        graphs.backward.replay()
        self.owner.replays += 1
        grad_hidden = buffers.out.clone() if self.hidden_grad else None
        copies = {}  # one clone per flat buffer: autograd may keep the returned tensors as .grad
        grads = []
        for view in graphs.grad_views:
            if view is None:
                grads.append(None)
                continue
            flat, where, shape = view
            if id(flat) not in copies:
                copies[id(flat)] = flat.clone()
            grads.append(copies[id(flat)][where].view(shape))
        return grad_hidden, grads

    def _differentiate(self, hidden, args, grad_out, function=None, params=None) -> tuple:
        leaf = hidden.detach().requires_grad_(self.hidden_grad)
        enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            out = (function or self.recompute)(leaf, *args)
        inputs = ([leaf] if self.hidden_grad else []) + list(self.params if params is None else params)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        return (grads[0] if self.hidden_grad else None), list(grads[self.hidden_grad:])

    def _capture_backward(self):
        """The backward graph. Its static tensors (RoPE tables, one flat gradient buffer per
        parameter dtype) are made before capturing: inside, they would come from the graph's pool."""
        buffers = self.buffers
        args = self._static_args()
        sizes: dict[torch.dtype, int] = {}
        views = []
        for p in self.params:
            start = sizes.get(p.dtype, 0)
            sizes[p.dtype] = start + p.numel()
            views.append((p.dtype, slice(start, start + p.numel()), p.shape))
        flats = {dtype: buffers.flat(dtype, n) for dtype, n in sizes.items()}
        views = [(flats[dtype], where, shape) for dtype, where, shape in views]

        # The capture differentiates with respect to aliases of the adapters (same memory, new
        # leaves): the adapters' own gradient accumulators were made on the default stream by the
        # forward, and autograd would make the capture stream wait on that stream, which a
        # capture cannot record.
        aliases = {id(p): p.detach().requires_grad_() for p in self.params}
        plan = self.plan.for_recomputation()
        plan = plan.with_layer(self.index, _with_adapters(plan.layer(self.index), aliases))
        function = functools.partial(self.layer.__call__, plan=plan)
        alias_params = [aliases[id(p)] for p in self.params]

        def body():
            grad_hidden, grads = self._differentiate(buffers.hidden, args, buffers.grad, function, alias_params)
            if grad_hidden is not None:
                buffers.out.copy_(grad_hidden)
            for i, g in enumerate(grads):
                if g is None:  # a parameter the layer does not use: no gradient, as eagerly
                    views[i] = None
                else:
                    flat, where, shape = views[i]
                    flat[where].view(shape).copy_(g)

        graph = self.owner.capture(body, "recomputation and backward")
        self.graphs.grad_views = views
        return graph
