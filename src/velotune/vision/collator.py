"""The vision data collator: conversations with images -> the processor's batch, with labels on the
assistant's answers only.

A row is `{"messages": [...]}` (or "conversations") in the docs' notebook format: each turn's
`content` is a string or a list of parts, `{"type": "image", "image": <PIL image | path>}` and
`{"type": "text", "text": ...}`; images may instead sit in the row's "images" list (TRL's format),
one per `{"type": "image"}` placeholder. Labels: the collator finds where each assistant answer
starts and ends by rendering the conversation up to it with the processor's own chat template
(`messages[:i]` plus the generation prompt, then `messages[:i+1]`) and counting the processor's
tokens, so the image tokens the processor inserts are counted exactly as in the batch. Every
other position (system/user turns, image tokens, padding) gets -100.
"""

from __future__ import annotations

import logging

import torch

from .images import ADVISED, check_resize, open_image, resized

logger = logging.getLogger("velotune")

IGNORE_INDEX = -100
CONVERSATION_KEYS = ("messages", "conversations")


class VisionDataCollator:
    """`UnslothVisionDataCollator(model, processor)`: pass it as `data_collator` to SFTTrainer with
    `remove_unused_columns=False` and `dataset_kwargs={"skip_prepare_dataset": True}`.

    `resize`: the longest image side in pixels (int; never enlarges), an exact `(width, height)`, or
    None (default) to keep the images as they are. `max_seq_length`: rows longer than this are cut
    (default: the model's max_seq_length when it has one); an image is never cut in half: a row whose
    cut would fall inside its image tokens is refused with its row number.
    """

    def __init__(self, model=None, processor=None, resize=None, max_seq_length: int | None = None,
                 ignore_index: int = IGNORE_INDEX, **kwargs):
        if processor is None:
            raise ValueError("UnslothVisionDataCollator(model, processor): pass the processor FastVisionModel."
                             "from_pretrained returned as the second argument")
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"the processor is a {type(processor).__name__}, not an image-text processor: pass the "
                             "processor FastVisionModel.from_pretrained returned")
        if kwargs:
            logger.warning("velotune: UnslothVisionDataCollator ignores arguments it does not use: %s", sorted(kwargs))
        check_resize(resize)
        self.processor = processor
        self.resize = resize
        self.ignore_index = ignore_index
        self.max_seq_length = max_seq_length or getattr(model, "max_seq_length", None)
        self.pad_id = processor.tokenizer.pad_token_id
        # The pixels in the model's 16-bit dtype: every family's tower casts them to its weights' dtype first, so the
        # result is the same and the batch half the size (Unsloth's collator does the same).
        dtype = getattr(model, "dtype", None)
        self.pixel_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        self.image_token_ids = _image_token_ids(processor)
        self._warned_size = False

    # ----- one row -----
    def _row(self, example, index: int) -> tuple[list[dict], list]:
        where = f"row {index} of the batch"
        messages = next((example[k] for k in CONVERSATION_KEYS if k in example and example[k] is not None), None)
        if messages is None:
            raise ValueError(f"{where} has no 'messages' column (keys: {sorted(example)}); each row must hold a "
                             "conversation whose user turns have {'type': 'image'} and {'type': 'text'} parts")
        placeholders, inline = 0, []
        for turn in messages:
            content = turn.get("content")
            for part in content if isinstance(content, list) else []:
                if part.get("type") == "image":
                    placeholders += 1
                    if part.get("image") is not None:
                        inline.append(part["image"])
        extra = example.get("images")
        extra = [] if extra is None else list(extra) if isinstance(extra, (list, tuple)) else [extra]
        if extra and inline:
            raise ValueError(f"{where} has images both inside its messages ({len(inline)}) and in an 'images' column "
                             f"({len(extra)}); keep one of the two")
        values = inline or extra
        if len(values) != placeholders:
            raise ValueError(f"{where}: its conversation has {placeholders} image placeholder(s) "
                             f"({{'type': 'image'}} parts) but {len(values)} image(s) were given; they must match one "
                             "to one")
        images = [resized(open_image(v, f"{where}, image {i}"), self.resize) for i, v in enumerate(values)]
        self._advise(images)
        return messages, images

    def _advise(self, images) -> None:
        longest = max((max(im.size) for im in images), default=0)
        if self.resize is None and longest > ADVISED[1] and not self._warned_size:
            self._warned_size = True
            logger.warning("velotune: images up to %d px are being trained at full size; the docs advise %d-%d px "
                           "(UnslothVisionDataCollator(model, processor, resize=%d) bounds them)", longest, *ADVISED,
                           ADVISED[1])

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(_strip(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _ids(self, text: str, images: list) -> list[int]:
        """The processor's token ids of `text` with its images (image tokens expanded)."""
        count = text.count(self._image_marker()) if images else 0
        batch = self.processor(text=[text], images=[images[:count]] if count else None, add_special_tokens=False,
                               return_tensors="pt")
        return batch["input_ids"][0].tolist()

    def _image_marker(self) -> str:
        return _image_marker(self.processor)

    def _answer_spans(self, messages, images, row: list[int], b: int) -> list[tuple[int, int]]:
        """(start, end) token positions of each assistant answer in `row` (the row's ids without padding).

        Each boundary is checked: the ids of the conversation rendered up to it must be exactly the row's
        first ids, else the template renders turns differently in context (or the tokenizer merges across
        the boundary) and the answer cannot be located; that is an error, never a guess."""
        spans = []
        for i, turn in enumerate(messages):
            if turn.get("role") not in ("assistant", "model", "gpt"):
                continue
            before = self._ids(self._render(messages[:i], True), images)
            through = self._ids(self._render(messages[: i + 1], False), images)
            for part in (before, through):
                if row[: len(part)] != part:
                    raise ValueError(
                        f"row {b} of the batch: the conversation rendered up to its turn {i} (the assistant's) does "
                        "not tokenize as the start of the whole conversation, so the answer's tokens cannot be "
                        "located. The chat template must render earlier turns the same whatever follows them")
            spans.append((len(before), len(through)))
        return spans

    # ----- the batch -----
    def __call__(self, examples):
        rows = [self._row(example, i) for i, example in enumerate(examples)]
        texts = [self._render(messages, False) for messages, _ in rows]
        images = [imgs for _, imgs in rows]
        has_images = any(images)
        if has_images and not all(images):
            raise ValueError(f"rows {[i for i, im in enumerate(images) if not im]} of the batch have no image while "
                             "others do; the processor takes a batch with images in every row")
        batch = self.processor(text=texts, images=images if has_images else None, padding=True,
                               add_special_tokens=False, return_tensors="pt")
        ids = batch["input_ids"]  # (B, T)
        labels = torch.full_like(ids, self.ignore_index)  # (B, T)
        lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else [ids.shape[1]] * len(rows)
        for b, (messages, imgs) in enumerate(rows):
            full = int(lengths[b])
            offset = self._row_offset(batch, b, full)
            row = ids[b, offset: offset + full].tolist()
            for start, end in self._answer_spans(messages, imgs, row, b):
                labels[b, offset + start: offset + end] = ids[b, offset + start: offset + end]
        if self.image_token_ids:
            labels[torch.isin(labels, torch.tensor(sorted(self.image_token_ids)))] = self.ignore_index
        batch["labels"] = labels
        pixels = batch.get("pixel_values")
        if self.pixel_dtype is not None and pixels is not None and pixels.is_floating_point():
            batch["pixel_values"] = pixels.to(self.pixel_dtype)
        return self._cut(batch)

    def _row_offset(self, batch, b: int, length: int) -> int:
        """Where row b's tokens start (left padding puts them at the end)."""
        if self.processor.tokenizer.padding_side == "left":
            return batch["input_ids"].shape[1] - length
        return 0

    def _cut(self, batch):
        limit = self.max_seq_length
        if limit is None or batch["input_ids"].shape[1] <= limit:
            return batch
        if self.image_token_ids and torch.isin(batch["input_ids"][:, limit:],
                                               torch.tensor(sorted(self.image_token_ids))).any():
            raise ValueError(f"a row of the batch has image tokens beyond max_seq_length={limit}; cutting there would "
                             "split an image. Raise max_seq_length or bound the images with resize=")
        for key in ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids",
                    "cross_attention_mask"):
            if key in batch:
                batch[key] = batch[key][:, :limit]
        return batch


def _strip(messages):
    """The conversation without image objects (templates only need the parts' types)."""
    out = []
    for turn in messages:
        content = turn.get("content")
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if k != "image" and v is not None} for part in content]
        out.append({**turn, "content": content})
    return out


def _image_marker(processor) -> str:
    """The text the chat template writes per image, which the processor expands into the image's tokens
    (Gemma 3 expands its begin-of-image token; the others their image token)."""
    for attr in ("boi_token", "image_token"):
        token = getattr(processor, attr, None)
        if isinstance(token, str):
            return token
    return "<image>"


def _image_token_ids(processor) -> set[int]:
    tokenizer = processor.tokenizer
    ids = set()
    for attr in ("image_token", "boi_token", "eoi_token", "image_break_token", "image_end_token",
                 "vision_start_token", "vision_end_token"):
        token = getattr(processor, attr, None)
        if isinstance(token, str):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids
