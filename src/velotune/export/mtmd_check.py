"""llama.cpp runs our `mmproj` file: its multimodal library (mtmd, shipped in llama-cpp-python when it is
built with it) encodes a probe image, and the image embeddings it hands to the language model must equal
the ones our model computes from the same pixels.

The probe is sized so neither side resizes it (`probe_size`). Both sides normalise the same uint8 pixels
with the processor's mean/std; what is left is llama.cpp's arithmetic (F16 weights, its own GELU/attention kernels):
on the tests' tiny Qwen2-VL / Qwen2.5-VL a relative error of 6-7e-4, where a file with one block's q and k
swapped gives 0.2-0.3 and Qwen2.5-VL's window pattern off by one block 0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path

import numpy as np
import psutil
import torch

from ..device import model_device
from .verify import ExportMismatchError
from .gguf_mmproj import projector_of
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


def probe_size(model, image_processor) -> tuple[int, int]:
    """(height, width) of a probe neither side resizes: the tower's square image_size where clip.cpp resizes
    every image to it (Gemma 3); else 8 x 2 merged patches (16p x 4p pixels for patch size p: a whole number of
    2x2 merged patches, above clip.cpp's minimum of 8 image tokens, wider than Qwen2.5-VL's 112-pixel window)."""
    config = base_model_of(model).config
    if projector_of(config).fixed_size:
        size = int(config.vision_config.image_size)
        return size, size
    unit = int(image_processor.patch_size) * int(getattr(image_processor, "merge_size", 2))
    return 2 * unit, 8 * unit


def probe_image(model, image_processor):
    """The probe (`probe_size`): ramps and a checker, so every patch differs."""
    from PIL import Image

    H, W = probe_size(model, image_processor)
    x = torch.arange(W)[None, :].expand(H, W)  # (H, W)
    y = torch.arange(H)[:, None].expand(H, W)
    checker = ((x // 8 + y // 8) % 2) * 120 + 60
    pixels = torch.stack([x * 255 // W, y * 255 // H, checker], -1).clamp(0, 255).to(torch.uint8)  # (H, W, 3)
    return Image.fromarray(pixels.numpy())


@contextlib.contextmanager
def _float32(module: torch.nn.Module):
    """`module` computing in float32 for the block, then every tensor back in its own dtype. Lossless: a 16-bit
    value is exact in float32 and casts back to itself. Why: a bf16 vision tower's own rounding was 1.5e-2
    (relative, Qwen2-VL-2B's tower) away from its float32 result, where llama.cpp's F16 file was 7e-4 from it."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield module
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


@contextlib.contextmanager
def _all_float32(modules: list[torch.nn.Module]):
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_float32(module))
        yield


@torch.no_grad()
def model_image_embeddings(model, image_processor, image, tokenizer=None) -> torch.Tensor:
    """(N, C) float32: the model's image features for `image` (what replaces the image tokens), at its own size,
    computed in float32; for a family whose image tokens have a break token after each row of patches
    (Pixtral's [IMG_BREAK], `ProjectorSpec.row_break`), that token's embedding after each row but the last, as
    the language model receives them and llama.cpp hands them over (`tokenizer` gives its id)."""
    base = base_model_of(model)
    spec = projector_of(base.config)
    batch = image_processor(images=[image], do_resize=False, return_tensors="pt")
    device = model_device(base)
    inputs = {k: batch[k].to(device) for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in batch}
    vision = [base.get_submodule(prefix.rstrip(".")) for prefix in spec.prefixes]
    was_training = base.training
    base.eval()
    try:
        with _all_float32(vision):
            out = base.model.get_image_features(**inputs, return_dict=True)
    finally:
        base.train(was_training)
    out = getattr(out, "pooler_output", out)  # Qwen, Llava: one (n_i, C) per image; Gemma 3: (images, n, C)
    features = out.reshape(-1, out.shape[-1]) if torch.is_tensor(out) else torch.cat(list(out), 0)
    features = features.float().cpu()  # (N, C)
    if spec.row_break:
        features = _with_row_breaks(base, features, image, image_processor, tokenizer, spec.row_break)
    return features


def _with_row_breaks(base, features: torch.Tensor, image, image_processor, tokenizer, token: str) -> torch.Tensor:
    """(rows * columns, C) patch features -> rows of patches with `token`'s input embedding between them."""
    token_id = None if tokenizer is None else tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        raise ValueError(f"the image embeddings of this model hold the {token} token's embedding: pass the "
                         "processor (its tokenizer has the token)")
    patch = int(base.config.vision_config.patch_size)
    rows, columns = image.height // patch, image.width // patch
    embed = base.get_input_embeddings()(torch.tensor([token_id], device=base.device)).float().cpu()  # (1, C)
    grid = features.reshape(rows, columns, -1)
    pieces = [torch.cat([grid[r], embed], 0) if r < rows - 1 else grid[r] for r in range(rows)]
    return torch.cat(pieces, 0)  # (rows * (columns + 1) - 1, C)


class _Mtmd:
    """llama.cpp's language model and mtmd context for one text GGUF + mmproj pair, and the probe prompt
    tokenized by mtmd (text chunks around the image chunk). Closes everything on exit."""

    def __init__(self, text_path: Path, mmproj: Path):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.lib, self.mtmd = llama_cpp, mtmd_cpp
        threads = min(4, psutil.cpu_count() or 1)
        self.llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=256, verbose=False, n_threads=threads)
        self.ctx = self.chunks = self.bitmap = None
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.ctx:
            self.close()
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not load {mmproj} (with {text_path})")
        self.name = mmproj.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.chunks:
            self.mtmd.mtmd_input_chunks_free(self.chunks)
        if self.bitmap:
            self.mtmd.mtmd_bitmap_free(self.bitmap)
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
        self.chunks = self.bitmap = self.ctx = None
        self.llm.close()

    def tokenize(self, image, text: str | None = None) -> list:
        """The chunks of `text` (its one media marker replaced by `image`; just the image when None)."""
        mtmd = self.mtmd
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        self.bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        encoded = mtmd.mtmd_default_marker() if text is None else text.encode()
        prompt = mtmd.mtmd_input_text()
        prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = encoded, len(encoded), False, True
        self.chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
        if mtmd.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(prompt), bitmaps, 1) != 0:
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not tokenize the probe prompt with {self.name}")
        return [mtmd.mtmd_input_chunks_get(self.chunks, i) for i in range(mtmd.mtmd_input_chunks_size(self.chunks))]

    def is_image(self, chunk) -> bool:
        return self.mtmd.mtmd_input_chunk_get_type(chunk) == self.mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE

    def text_tokens(self, chunk) -> list[int]:
        n = ctypes.c_size_t(0)
        tokens = self.mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        return [int(tokens[i]) for i in range(n.value)]


def llama_cpp_image_embeddings(text_path: Path, mmproj: Path, image) -> torch.Tensor:
    """(N, C) float32: what llama.cpp's mtmd feeds the language model for `image`."""
    with _Mtmd(text_path, mmproj) as run:
        images = [c for c in run.tokenize(image) if run.is_image(c)]
        if len(images) != 1 or run.mtmd.mtmd_encode_chunk(run.ctx, images[0]) != 0:
            raise ImageEmbeddingMismatch(f"llama.cpp's mtmd could not encode the probe image with {mmproj}")
        n = run.mtmd.mtmd_input_chunk_get_n_tokens(images[0])
        width = run.lib.llama_model_n_embd(run.llm.model)
        values = np.ctypeslib.as_array(run.mtmd.mtmd_get_output_embd(run.ctx), shape=(n * width,))
        return torch.from_numpy(values.copy()).reshape(n, width)


def llama_cpp_prompt_logits(text_path: Path, mmproj: Path, text: str, image) -> tuple[list[int], torch.Tensor]:
    """(the text tokens mtmd made of `text`, in order, without the image's; the next-token logits (V,) float32
    after the whole prompt): llama.cpp's language model fed text and image embeddings at its own M-RoPE
    positions."""
    with _Mtmd(text_path, mmproj) as run:
        chunks = run.tokenize(image, text)
        tokens = [t for c in chunks if not run.is_image(c) for t in run.text_tokens(c)]
        past = run.lib.llama_pos(0)
        if run.mtmd.mtmd_helper_eval_chunks(run.ctx, run.llm._ctx.ctx, run.chunks, 0, 0, 64, True,
                                            ctypes.byref(past)) != 0:
            raise ImageEmbeddingMismatch(f"llama.cpp could not evaluate the probe prompt with {mmproj}")
        vocab = run.lib.llama_vocab_n_tokens(run.lib.llama_model_get_vocab(run.llm.model))
        logits = np.ctypeslib.as_array(run.lib.llama_get_logits_ith(run.llm._ctx.ctx, -1), shape=(vocab,))
        return tokens, torch.from_numpy(logits.copy())


def check_image_embeddings(model, text_path: Path, mmproj: Path, image_processor, tokenizer=None) -> float:
    """Relative L2 error of llama.cpp's embeddings of the probe image vs the model's; raises above the budget."""
    image = probe_image(model, image_processor)
    ours = model_image_embeddings(model, image_processor, image, tokenizer)
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
