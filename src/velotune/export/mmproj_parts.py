"""What every `mmproj` layout shares: the refusal error, one tensor of the file (where its values come from and
how they change on the way), the converter's default tensor types, and the `clip.vision.*` keys every
projector has. The family layouts (mmproj_qwen.py, mmproj_gemma3.py) build on these; gguf_mmproj.py writes
and checks the file."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from .gguf_arch import _interleave_heads
from .weights import TensorPlan

Q = gguf.GGMLQuantizationType


class MmprojUnsupported(ValueError):
    """llama.cpp's clip.cpp cannot run this vision tower as the checkpoint configures it."""


@dataclass(frozen=True)
class MmprojTensor:
    """One tensor of the file: made from `plan`'s merged tensor, the `rows` slice of it (q/k/v of a fused
    qkv, one token's embedding row) or one temporal `frame` of a Conv3d kernel, or all of it; `shift` is added
    to every value (a norm stored as 1 + w where the model computes (1 + w) from w, as llama.cpp's converter
    does for Gemma); `interleave` > 0: q/k rows interleaved per head for a rope on adjacent pairs (Pixtral)."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    plan: TensorPlan
    rows: tuple[int, int] | None = None
    frame: int | None = None
    shift: float = 0.0
    interleave: int = 0

    def take(self, value: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            value = value[self.rows[0]:self.rows[1]]
        if self.frame is not None:
            value = value[:, :, self.frame]  # (C_out, C_in, kt, p, p) -> (C_out, C_in, p, p)
        value = value.float()
        if self.shift:
            value = value + self.shift
        if self.interleave:
            value = _interleave_heads(value, self.interleave)
        return value.reshape(self.shape).contiguous()


def default_qtype(gguf_name: str, ndim: int, file_qtype: Q) -> Q:
    """The converter's rule: 1-D tensors, norms and position embeddings in F32, the rest in the file's type."""
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or ".position_embd." in gguf_name:
        return Q.F32
    return file_qtype


def tensor_names(blocks: int) -> gguf.TensorNameMap:
    """gguf-py's hub-name -> mmproj-name table; the projector's `mm.N` names share the block-numbered table, so
    it is built for at least 3 blocks (llama.cpp's own converter fails on a 2-block tower at `mm.2`)."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(blocks, 3))


def gguf_name(names: gguf.TensorNameMap, hub_name: str, model_name: str) -> str:
    found = names.get_name(hub_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise MmprojUnsupported(f"no llama.cpp mmproj tensor for {model_name!r} (hub name {hub_name!r})")
    return found


def image_stats(image_processor) -> tuple[list[float], list[float]]:
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None or len(mean) < 3 or len(std) < 3:
        raise ValueError("the mmproj file needs the image processor's image_mean and image_std: pass the processor "
                         "FastVisionModel.from_pretrained returned as the tokenizer argument")
    return [float(x) for x in mean[:3]], [float(x) for x in std[:3]]


def write_vision_keys(writer: gguf.GGUFWriter, config, image_processor, *, image_size: int, width: int,
                      feed_forward: int, blocks: int, heads: int, patch_size: int) -> None:
    """The keys every projector has, in the converter's order (MmprojModel.set_gguf_parameters)."""
    mean, std = image_stats(image_processor)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config.get_text_config().hidden_size)
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(width)
    writer.add_vision_feed_forward_length(feed_forward)
    writer.add_vision_block_count(blocks)
    writer.add_vision_head_count(heads)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
