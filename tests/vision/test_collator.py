"""The vision collator: labels on exactly the assistant's answers (found here independently, by scanning
the token ids for each template's assistant header and end-of-turn tokens), images resized to the bound,
and the bad rows of issue 20 named."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from velotune import UnslothVisionDataCollator
from velotune.vision.images import ImageError, resized

from tiny import vision as tiny

# (assistant header, end of the answer, included) as text, per chat template of tests/tiny/vision.py
ANSWER_MARKS = {
    "qwen2_vl": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "qwen2_5_vl": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "mllama": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "llava": ("[/INST]", "</s>"),
    "gemma3": ("<start_of_turn>model\n", "<end_of_turn>\n"),
}


def _image(rgb=(200, 30, 30), size=(40, 28)):
    return Image.new("RGB", size, rgb)


def _rows():
    one = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    two = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image", "image": _image()}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
        {"role": "user", "content": [{"type": "image", "image": _image((20, 20, 220))},
                                     {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}
    return [one, two]


def _expected_labels(ids: list[int], tokenizer, header: str, end: str) -> list[int]:
    """-100 everywhere but from after each assistant header through its end-of-answer marker."""
    head = tokenizer(header, add_special_tokens=False)["input_ids"]
    stop = tokenizer(end, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i: i + len(head)] == head:
            j = i + len(head)
            while ids[j: j + len(stop)] != stop:
                j += 1
            labels[i + len(head): j + len(stop)] = ids[i + len(head): j + len(stop)]
            i = j + len(stop)
        else:
            i += 1
    return labels


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_labels_are_exactly_the_assistant_answers(family):
    model, processor = tiny.build(family)
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    tok = processor.tokenizer
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" in batch
    answers = []
    for b in range(2):
        ids = batch["input_ids"][b].tolist()
        assert batch["labels"][b].tolist() == _expected_labels(ids, tok, *ANSWER_MARKS[family])
        answers.append(tok.decode(batch["labels"][b][batch["labels"][b] != -100]))
    end = ANSWER_MARKS[family][1]
    assert answers == [f"red{end}", f"a red square{end}blue{end}"]
    with torch.no_grad():  # the batch is what the model takes
        assert torch.isfinite(model(**batch).loss)


def test_bad_rows_are_named(tmp_path):
    model, processor = tiny.build("qwen2_vl")
    collate = UnslothVisionDataCollator(model, processor)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    rows = _rows()
    rows[1]["messages"][0]["content"][1]["image"] = str(broken)
    with pytest.raises(ImageError, match=r"row 1 of the batch, image 0: cannot open .*broken.png"):
        collate(rows)
    rows = _rows()
    del rows[1]["messages"][2]["content"][0]["image"]  # a placeholder without its image
    with pytest.raises(ValueError, match=r"row 1 of the batch: .* 2 image placeholder\(s\) .* but 1 image\(s\)"):
        collate(rows)
    rows = _rows()
    rows[0]["messages"][0]["content"][0]["image"] = "https://example.com/cat.png"
    with pytest.raises(ImageError, match="row 0 of the batch, image 0: .* is a URL"):
        collate(rows)
    with pytest.raises(ValueError, match="no 'messages' column"):
        collate([{"text": "hello"}])
    with pytest.raises(ValueError, match="resize=0"):
        UnslothVisionDataCollator(model, processor, resize=0)


def test_images_from_paths_and_an_images_column(tmp_path):
    model, processor = tiny.build("gemma3")
    path = tmp_path / "red.png"
    _image().save(path)
    inline = _rows()[:1]
    inline[0]["messages"][0]["content"][0]["image"] = str(path)
    column = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
               "images": [_image()]}]
    collate = UnslothVisionDataCollator(model, processor)
    a, b = collate(inline), collate(column)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_resize_bound(caplog):
    big = _image(size=(1600, 800))
    assert resized(big, 500).size == (500, 250)  # longest side bounded, aspect kept
    assert resized(_image(size=(300, 200)), 500).size == (300, 200)  # never enlarged
    assert resized(big, (64, 32)).size == (64, 32)
    model, processor = tiny.build("gemma3")
    rows = _rows()[:1]
    rows[0]["messages"][0]["content"][0]["image"] = big
    with caplog.at_level(logging.WARNING, logger="velotune"):
        UnslothVisionDataCollator(model, processor)(rows)
    assert "advise 300-1000 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="velotune"):
        UnslothVisionDataCollator(model, processor, resize=512)(rows)
    assert "advise" not in caplog.text


def test_max_seq_length_cuts_text_but_never_an_image():
    model, processor = tiny.build("qwen2_vl")
    rows = _rows()[:1]
    rows[0]["messages"][1]["content"][0]["text"] = "red " * 20
    full = UnslothVisionDataCollator(model, processor)(rows)
    cut = UnslothVisionDataCollator(model, processor, max_seq_length=full["input_ids"].shape[1] - 10)(rows)
    assert cut["input_ids"].shape[1] == full["input_ids"].shape[1] - 10
    assert torch.equal(cut["labels"], full["labels"][:, :-10])
    with pytest.raises(ValueError, match="image tokens beyond max_seq_length=5"):
        UnslothVisionDataCollator(model, processor, max_seq_length=5)(rows)


def test_a_template_that_renders_turns_differently_in_context_is_refused():
    """A template whose earlier turns change with what follows cannot be masked by rendering prefixes."""
    model, processor = tiny.build("qwen2_vl")
    processor.chat_template = processor.chat_template.replace(
        "<|im_end|>\n{% endfor %}", "{% if loop.last %}<|im_end|>{% else %}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="row 0 of the batch: the conversation rendered up to its turn 1"):
        UnslothVisionDataCollator(model, processor)(_rows()[:1])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pixels_come_in_the_models_16bit_dtype_with_the_same_result(family):
    """A bf16 model gets bf16 pixel values (half the batch); its tower would cast fp32 ones to bf16 itself, so the
    loss is the same bit for bit."""
    model, processor = tiny.build(family)
    model = model.to(torch.bfloat16).eval()
    batch = UnslothVisionDataCollator(model, processor)(_rows())
    assert batch["pixel_values"].dtype == torch.bfloat16
    full = UnslothVisionDataCollator(None, processor)(_rows())
    assert full["pixel_values"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, model(**full).loss)
