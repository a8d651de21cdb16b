"""Response-only training: labels are -100 everywhere except the assistant's answers.

Markers are matched in the decoded *text*, not as token-id subsequences. A marker such as
"<|im_start|>assistant\n" can tokenize differently alone and in context (BPE merges its last
newline with what follows), so id matching silently misses it and every label ends up masked.
Text matching cannot miss; the char positions are mapped back to tokens by bisecting on the
lengths of decoded prefixes, which works for any tokenizer (fast or slow, byte-level or
sentencepiece) without offset mappings.

A trained span starts right after a response marker and ends where the next instruction marker
begins (or at the end of the sequence), so the end-of-turn token after each answer is trained:
the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class ResponseMarkerError(ValueError):
    """The markers never match: training would see no labels at all."""


def _find_all(text: str, needle: str) -> list[int]:
    out, start = [], text.find(needle)
    while start >= 0:
        out.append(start)
        start = text.find(needle, start + 1)
    return out


@dataclass
class MaskResult:
    labels: list[int]
    responses: int  # response markers found
    instructions: int  # instruction markers found


class ResponseMasker:
    """Computes response-only labels for token ids, given the two marker strings."""

    def __init__(self, tokenizer, instruction_part: str, response_part: str):
        if not response_part:
            raise ValueError("response_part must be a non-empty string")
        if not instruction_part:
            raise ValueError("instruction_part must be a non-empty string")
        self.tokenizer = tokenizer
        self.instruction_part = instruction_part
        self.response_part = response_part

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def char_spans(self, text: str) -> tuple[list[tuple[int, int]], int, int]:
        """Trained [start, end) char spans, and how many response/instruction markers were found."""
        resp = _find_all(text, self.response_part)
        inside_resp = {p + k for p in resp for k in range(len(self.response_part))}
        instr = [p for p in _find_all(text, self.instruction_part) if p not in inside_resp]
        spans: list[tuple[int, int]] = []
        for p in resp:
            start = p + len(self.response_part)
            end = next((q for q in instr if q >= start), len(text))
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((start, end))
        return spans, len(resp), len(instr)

    def mask(self, input_ids, labels=None) -> MaskResult:
        ids = list(input_ids)
        base = list(labels) if labels is not None else ids
        text = self.decode(ids)
        spans, n_resp, n_instr = self.char_spans(text)
        cache: dict[int, int] = {0: 0, len(ids): len(text)}

        def start_of(i: int) -> int:  # char offset where token i starts
            if i not in cache:
                cache[i] = len(self.decode(ids[:i]))
            return cache[i]

        def first_token_at_or_after(pos: int) -> int:  # smallest i with start_of(i) >= pos
            lo, hi = 0, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if start_of(mid) >= pos:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        out = [IGNORE_INDEX] * len(ids)
        for a, b in spans:
            first = first_token_at_or_after(a)
            if first > 0 and start_of(first) > a:  # token straddles the marker end: train on it
                first -= 1
            last = first_token_at_or_after(b)
            for i in range(first, last):
                out[i] = base[i]
        return MaskResult(out, n_resp, n_instr)

    def mask_packed(self, input_ids, labels=None, seq_lengths=None) -> MaskResult:
        """Mask each packed sub-sequence on its own, so one sample's answer never runs into the next."""
        if not seq_lengths:
            return self.mask(input_ids, labels)
        ids, base = list(input_ids), list(labels) if labels is not None else None
        out, n_resp, n_instr, start = [], 0, 0, 0
        for length in seq_lengths:
            part = self.mask(ids[start:start + length], None if base is None else base[start:start + length])
            out += part.labels
            n_resp += part.responses
            n_instr += part.instructions
            start += length
        return MaskResult(out, n_resp, n_instr)

    def describe_failure(self, input_ids, what: str) -> str:
        text = self.decode(input_ids)
        shown = text if len(text) <= 600 else text[:600] + f"... [{len(text) - 600} more chars]"
        return (f"{what}\n  instruction_part = {self.instruction_part!r}\n  response_part    = "
                f"{self.response_part!r}\nA rendered example from the dataset:\n{shown!r}\n"
                "Pass the markers exactly as they appear in the rendered text (whitespace and newlines "
                "included), or use the chat template they belong to.")


class DataCollatorForResponseOnly:
    """Pads a batch and builds response-only labels (or pads precomputed `labels`).

    Raises when a whole batch has no trained token, instead of letting the loss become 0/0.
    """

    def __init__(self, tokenizer, instruction_part: str, response_part: str, pad_to_multiple_of: int | None = None):
        self.masker = ResponseMasker(tokenizer, instruction_part, response_part)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_token_id = pad
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            if "labels" in ex and ex["labels"] is not None:
                labels = list(ex["labels"])
            else:
                labels = self.masker.mask_packed(ex["input_ids"], None, ex.get("seq_lengths")).labels
            rows.append((list(ex["input_ids"]), labels))
        if all(lbl == IGNORE_INDEX for _, labels in rows for lbl in labels):
            raise ResponseMarkerError(self.masker.describe_failure(
                rows[0][0], "No token in this batch lies inside an assistant response."))
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, lbl) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, :len(lbl)] = torch.tensor(lbl)
            attention[b, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
