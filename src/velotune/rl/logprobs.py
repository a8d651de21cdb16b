"""Per-token log-probabilities (and entropies) of completion tokens without the full logits tensor.

The backbone's hidden states of the completion positions go through the chunked log-prob kernel
(`kernels/logprobs.py`): only a chunk of (tokens, vocabulary) logits exists at once, in forward and
backward. That is where GRPO's memory goes at long completions (the docs: 8 generations x 20K tokens
x 128K vocabulary is 78 GB of logits in standard implementations).
"""

from __future__ import annotations

import torch

from ..fast.plan import FastPathDecoder
from ..kernels.logprobs import chunked_logprobs

ENTROPY_CHUNK_BYTES = 64 * 2 ** 20  # fp32 logits of one (no-grad) entropy chunk: 128 tokens at a 128K vocabulary


def causal_lm_parts(model):
    """(backbone, lm_head) of a causal LM, through a PEFT wrapper; lm_head None when it is not a plain
    Linear (a LoRA on lm_head, soft-capped logits): then the model's own forward is used."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the decoder stack under the LM head: transformers' `base_model` (base_model_prefix), else `.model`
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        backbone = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    plain = isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and head.bias is None
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if backbone is None or backbone is base or not plain or softcap:
        return None, None
    return backbone, head


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (a left-padded prompt starts at 0), as generate numbers them."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, L)
    return positions.masked_fill(attention_mask == 0, 1)


def only_right_padding(attention_mask: torch.Tensor) -> bool:
    """Every row is real tokens then padding (no left padding): (B, L) 0/1, one host sync."""
    real = attention_mask.bool()
    return bool(real[:, 0].all() and (real[:, 1:] <= real[:, :-1]).all())


def backbone_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pads_matter: bool = False) -> torch.Tensor:
    """The decoder stack's last hidden states (B, L, H) of padded rows. Our decoder numbers positions from
    the mask itself (explicit ids would mean packed sequences to it); others get cumsum(mask) - 1.

    Rows padded on the right only (a GRPO micro-batch of one prompt's completions, ORPO/CPO pairs) run without
    the mask: under causal attention no real token sees a later pad, so the real tokens' states are the same,
    and attention keeps SDPA's causal kernels instead of an explicit (B, 1, L, L) mask (3.2 GB of booleans and
    the slower kernels at 8 x 20K tokens). The pads' states are then not meaningful; callers mask them out, or
    pass pads_matter=True (ORPO/CPO: TRL's `logits/*` metrics average over the pads' positions too)."""
    if not pads_matter and only_right_padding(attention_mask):
        return backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    extra = {} if isinstance(backbone, FastPathDecoder) else {"position_ids": _position_ids(attention_mask)}
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                        temperature: float = 1.0, entropy: bool = False):
    """input_ids (B, P + C) = left-padded prompt + right-padded completion; returns (logps (B, C) fp32,
    entropies (B, C) fp32 or None). Token t's log-probability comes from position t - 1."""
    backbone, head = causal_lm_parts(model)
    targets = input_ids[:, -completion_length:]  # (B, C)
    positions = _position_ids(attention_mask)
    if backbone is None:  # the model's own logits (a LoRA/biased/soft-capped head): full logits of the completion
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        extra = {} if isinstance(getattr(base, "model", None), FastPathDecoder) else {"position_ids": positions}
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=completion_length + 1, **extra)
        logits = out.logits[:, -completion_length - 1:-1].float() / temperature  # (B, C, V)
        logp_all = logits.log_softmax(-1)
        logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
        return logps, ent
    hidden = backbone_hidden(backbone, input_ids, attention_mask)  # (B, P + C, H)
    hidden = hidden[:, -completion_length - 1:-1]  # (B, C, H): the positions that predict the completion
    # The kernel on the GPU; the CPU takes its reference even under Triton's interpreter (which the tests set for
    # the kernel tests; interpreted, the log-probs of a CI GRPO step cost more than the model)
    logps = chunked_logprobs(hidden, head.weight, targets, temperature=temperature,
                             use_triton=None if hidden.is_cuda else False)  # (B, C)
    ent = chunked_entropy(hidden.detach(), head.weight, temperature) if entropy else None
    return logps, ent


@torch.no_grad()
def chunked_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T / T) per token, (B, C) fp32, a few tokens at a time: at most
    ENTROPY_CHUNK_BYTES of fp32 logits (and two temporaries like them) exist at once. The former fixed
    1,024-token chunk was 0.5 GiB of fp32 logits at a 128K vocabulary, with four temporaries like it (about
    2 GiB): a suspect for GRPO's peak 1.8 GiB above Unsloth's at the 1B shape (window-1 bench,
    2026-11-30), to be confirmed by the next run of bench/bench_grpo.py."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    w = weight.to(flat.dtype)
    chunk = max(1, ENTROPY_CHUNK_BYTES // (4 * w.shape[0]))
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        logits = (flat[start:start + chunk] @ w.t()).float().div_(temperature)  # (n, V)
        lse = torch.logsumexp(logits, -1)  # (n,)
        # H = lse - sum_v p_v z_v, with p = softmax(z)
        out[start:start + chunk] = lse - (torch.softmax(logits, -1).mul_(logits)).sum(-1)
    return out.view(hidden.shape[:-1])
