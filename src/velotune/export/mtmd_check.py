"""llama.cpp runs our `mmproj` file: its multimodal library (mtmd, shipped in llama-cpp-python when it is
built with it) encodes a probe image, and the image embeddings it hands to the language model must equal
the ones our model computes from the same pixels.

The probe is sized so neither side resizes it: 128 x 32 pixels is a whole number of 2x2 merged 8..16-pixel
patches, above clip.cpp's minimum of 8 image tokens, and wider than Qwen2.5-VL's 112-pixel attention
window, so windowed blocks are exercised too. Both sides normalise the same uint8 pixels with the
processor's mean/std; what is left is llama.cpp's arithmetic (F16 weights, its own GELU/attention kernels):
on the tests' tiny Qwen2-VL / Qwen2.5-VL a relative error of 6-7e-4, where a file with one block's q and k
swapped gives 0.2-0.3 and Qwen2.5-VL's window pattern off by one block 0.1.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import psutil
import torch

from .verify import ExportMismatchError
from .weights import base_model_of

logger = logging.getLogger("velotune")

EMBEDDING_BUDGET = 2e-2  # relative L2 error of llama.cpp's image embeddings vs ours (see module docstring)


class ImageEmbeddingMismatch(ExportMismatchError):
    """llama.cpp's image embeddings from the mmproj file are not the model's."""


def mtmd_available() -> bool:
    """Whether llama-cpp-python can load its multimodal library (CI builds it with LLAVA_BUILD=OFF otherwise)."""
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401 - loading the module loads libmtmd
    except (ImportError, OSError, RuntimeError, FileNotFoundError):
        return False
    return True


def probe_image():
    """128 x 32 RGB: horizontal and vertical ramps and a checker, so every patch differs."""
    from PIL import Image

    x = torch.arange(128)[None, :].expand(32, 128)  # (H, W)
    y = torch.arange(32)[:, None].expand(32, 128)
    checker = ((x // 8 + y // 8) % 2) * 120 + 60
    pixels = torch.stack([x * 2, y * 8, checker], -1).clamp(0, 255).to(torch.uint8)  # (H, W, 3)
    return Image.fromarray(pixels.numpy())


@torch.no_grad()
def model_image_embeddings(model, image_processor, image) -> torch.Tensor:
    """(N, C) float32: the model's merged image features for `image`, at its own size."""
    base = base_model_of(model)
    batch = image_processor(images=[image], do_resize=False, return_tensors="pt")
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        out = base.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device),
                                            return_dict=True).pooler_output
    finally:
        base.train(was_training)
    return torch.cat(list(out), 0).float().cpu()


def llama_cpp_image_embeddings(text_path: Path, mmproj: Path, image) -> torch.Tensor:
    """(N, C) float32: what llama.cpp's mtmd feeds the language model for `image`."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    threads = min(4, psutil.cpu_count() or 1)
    llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=256, verbose=False, n_threads=threads)
    ctx = chunks = bitmap = None
    try:
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
        ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
        if not ctx:
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not load {mmproj} (with {text_path})")
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        text = mtmd_cpp.mtmd_input_text()
        marker = mtmd_cpp.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not tokenize the probe image with {mmproj}")
        every = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
        image_type = mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE
        image_chunks = [c for c in every if mtmd_cpp.mtmd_input_chunk_get_type(c) == image_type]
        if len(image_chunks) != 1 or mtmd_cpp.mtmd_encode_chunk(ctx, image_chunks[0]) != 0:
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not encode the probe image with {mmproj}")
        n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(image_chunks[0])
        width = llama_cpp.llama_model_n_embd(llm.model)
        values = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n * width,))
        return torch.from_numpy(values.copy()).reshape(n, width)
    finally:
        if chunks:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        if ctx:
            mtmd_cpp.mtmd_free(ctx)
        llm.close()


def check_image_embeddings(model, text_path: Path, mmproj: Path, image_processor) -> float:
    """Relative L2 error of llama.cpp's embeddings of the probe image vs the model's; raises above the budget."""
    image = probe_image()
    ours = model_image_embeddings(model, image_processor, image)
    theirs = llama_cpp_image_embeddings(text_path, mmproj, image)
    if theirs.shape != ours.shape:
        raise ImageEmbeddingMismatch(f"{mmproj.name}: llama.cpp made {tuple(theirs.shape)} image embeddings of the "
                                     f"probe image, the model {tuple(ours.shape)}")
    error = float((theirs - ours).norm() / ours.norm())
    logger.info("velotune: export check (llama.cpp mtmd) %s: image embeddings relative error %.2e; budget %.0e",
                mmproj.name, error, EMBEDDING_BUDGET)
    if not error <= EMBEDDING_BUDGET:
        raise ImageEmbeddingMismatch(f"{mmproj.name}: llama.cpp's image embeddings differ from the model's by "
                                     f"{error:.2e} (relative), above the {EMBEDDING_BUDGET:.0e} its arithmetic "
                                     "explains. The files were kept for inspection; please report this.")
    return error
