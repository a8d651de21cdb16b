"""velotune's trainer under DDP (torchrun / accelerate launch): the DDP settings our fast path needs,
which rank writes, and how the ranks agree on a run before they train.

DDP itself is PyTorch's (`DistributedDataParallel`, set up by transformers' Trainer through
accelerate); this module only decides what velotune's additions need from it:

* `find_unused_parameters=False` (unless the user set `ddp_find_unused_parameters`). The offloading
  checkpoint (fast/checkpointing.py) is reentrant-style: a layer's forward runs under no_grad, so
  the autograd graph of the step's output does not reach the layer's LoRA weights. With
  `find_unused_parameters=True` (transformers' default for a PEFT model, which is not a
  `PreTrainedModel`) DDP walks that graph after forward, marks every checkpointed weight unused and
  ready, and then fails ("mark a variable ready only once") when the recomputation in backward
  produces its gradient. With False, DDP waits for each trainable weight's gradient hook, which the
  recomputation fires (and layer_graphs.py's graphed layers return their gradients to autograd, so
  their hooks fire too). Every trainable weight gets a gradient in every step of a LoRA run, the
  condition False needs. `static_graph` stays off: it is not needed for correctness here, and it
  would forbid a step whose set of trained weights changes (an adapter switched off for one step).
* `broadcast_buffers` is left to DDP (True): our models' only buffers are the small rotary tables,
  so re-sending them before each forward costs little, and accelerate warns on every run where it is set.
* Only trainable parameters are all-reduced: DDP buckets the parameters that require a gradient,
  and every frozen base weight (16-bit or NF4) is left out.
* One process writes: the run lock is rank 0's; checkpoints' shared files, plots and summaries come
  from the process whose `args.should_save` is true (global rank 0; also local rank 0 of each node
  with `save_on_each_node`, for nodes without shared storage); every rank writes its own `rng_state_<rank>.pth` into the same staged
  checkpoint, so all ranks must agree on the staging folder (`agree_on_run`) and wait for one
  another before it is published (`barrier`).
"""

from __future__ import annotations

import torch

from ..fast.plan import find_decoder
from ..launch import check_gpu_count, current


class RankFailedError(RuntimeError):
    """Another rank failed in a step all ranks take together; its message is carried over."""


def apply_ddp_defaults(args) -> None:
    """Fill the DDP settings the user left unset (None) with the values velotune's fast path needs."""
    if getattr(args, "ddp_find_unused_parameters", None) is None:
        args.ddp_find_unused_parameters = False


def check_launch(args, model) -> None:
    """Before any work: more processes than GPUs on this machine is an error naming both numbers, and
    `ddp_find_unused_parameters=True` with the offloading checkpoint (which DDP would fail on in the
    first backward, see above) is an error naming the two fixes; with use_gradient_checkpointing=True
    it makes the plan checkpoint through torch's non-reentrant checkpoint (RuntimeSettings.torch_checkpoint)
    instead of the fast path's reentrant-style function, which DDP would fail on the same way."""
    launch = current()
    if not launch.distributed:
        return
    if not getattr(args, "use_cpu", False) and torch.cuda.is_available():
        check_gpu_count(launch)
    decoder = find_decoder(model) if isinstance(model, torch.nn.Module) else None
    if args.ddp_find_unused_parameters is True and decoder is not None and decoder.runtime.checkpointing == "unsloth":
        raise ValueError(
            "ddp_find_unused_parameters=True cannot train with use_gradient_checkpointing='unsloth' under DDP: that "
            "checkpoint recomputes each layer in backward, where DDP would see weights it had marked unused and "
            "stop ('mark a variable ready only once'). Leave ddp_find_unused_parameters unset (velotune sets False: "
            "every LoRA weight gets a gradient each step), or use use_gradient_checkpointing=True")
    if decoder is not None:
        decoder.runtime.torch_checkpoint = args.ddp_find_unused_parameters is True


def active() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a process group)."""
    if active():
        torch.distributed.barrier()


def agree_on_run(start):
    """Run `start()` on rank 0 only (it takes the run lock) and hand its result to every rank; when it
    raises, the other ranks raise RankFailedError with its message instead of waiting in the next
    collective until the launcher or a timeout stops them."""
    if not active():
        return start()
    outcome = [None, None]
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            outcome = [start(), None]
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = exc
            outcome = [None, f"{type(exc).__name__}: {exc}"]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise RankFailedError(f"rank 0 stopped before training, so this rank stops too: {outcome[1]}")
    return outcome[0]
