"""Images for the vision collator: opened from what a dataset row holds, converted to RGB, and
shrunk to the bound the user sets (the docs advise 300-1000 px: larger images cost image tokens,
time and memory without helping most tasks)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

ADVISED = (300, 1000)  # the docs' advice for the longer side, in pixels


class ImageError(ValueError):
    """An image of a dataset row could not be opened."""


def open_image(value, where: str) -> Image.Image:
    """A PIL image from a PIL image, a local path, bytes or a `{"bytes"|"path": ...}` dict (datasets'
    Image feature undecoded). URLs are refused: training must not depend on the network."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return open_image(value.get("bytes") or value.get("path"), where)
    elif isinstance(value, (bytes, bytearray)):
        import io

        image = _open(io.BytesIO(value), where, "the image bytes")
    elif isinstance(value, (str, os.PathLike)):
        text = str(value)
        if text.startswith(("http://", "https://")):
            raise ImageError(f"{where}: {text!r} is a URL; download the images first and give local paths or "
                             "PIL images (training reads no network)")
        path = Path(text).expanduser()
        if not path.is_file():
            raise ImageError(f"{where}: no image file at {path}")
        image = _open(path, where, str(path))
    else:
        raise ImageError(f"{where}: an image must be a PIL image, a local path or bytes, got {type(value).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _open(source, where: str, what: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()  # decode now, so a truncated file fails here and not inside the processor
    except Exception as error:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise ImageError(f"{where}: cannot open {what} as an image ({type(error).__name__}: {error})") from error
    return image


def check_resize(resize) -> None:
    if resize is None:
        return
    if isinstance(resize, bool) or not (isinstance(resize, int) and resize > 0 or isinstance(resize, tuple)
                                        and len(resize) == 2 and all(isinstance(v, int) and v > 0 for v in resize)):
        raise ValueError(f"resize={resize!r}: pass the longest side in pixels (an int, e.g. 512; the docs advise "
                         f"{ADVISED[0]}-{ADVISED[1]}), an exact (width, height), or None to keep the images as "
                         "they are")


def resized(image: Image.Image, resize) -> Image.Image:
    """`image` within the bound: an int caps the longer side (aspect ratio kept, never enlarged); a
    (width, height) pair is the exact size."""
    if resize is None:
        return image
    if isinstance(resize, tuple):
        return image if image.size == resize else image.resize(resize, Image.Resampling.BICUBIC)
    width, height = image.size
    longest = max(width, height)
    if longest <= resize:
        return image
    scale = resize / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
