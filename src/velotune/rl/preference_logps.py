"""ORPO's and CPO/SimPO's forward pass without the (2B, T, V) logits.

TRL's (experimental) ORPO and CPO trainers run `model(...)`, keep the full logits of chosen and rejected
rows, and take log-softmaxes of them: 2 x 8 x 2K x 128K fp32 logits is 16 GiB at an 8B shape. Here the
backbone's hidden states go through velotune's chunked log-prob kernel (`kernels/logprobs.py`): one
per-token log-probability per position, logits recomputed a chunk at a time in backward. Everything TRL
reads from `concatenated_forward` is rebuilt from those:

    log p_t        = chunked_logprobs(h_{t-1}, W, id_t)                      (2B, T - 1)
    chosen NLL     = -mean of log p_t over the chosen rows' scored tokens     (ORPO: every real token;
                                                                               CPO: the answer tokens)
    sequence logps = sum (or mean: ORPO, CPO's ipo/simpo) over answer tokens  (2B,)
    logits mean    = mean over positions of h . mean_v(W)                    (the `logits/*` metrics are a
                                                                               mean over the vocabulary, linear)
DPO and KTO need none of this: TRL 1.16 gives them its own chunked LM head (`fused_lm_head=True`).
A model this cannot serve (encoder-decoder, a LoRA/biased/soft-capped head, MoE auxiliary loss, a wrapped
model under DDP) takes TRL's own path unchanged.
"""

from __future__ import annotations

import torch

from ..kernels.logprobs import chunked_logprobs
from .logprobs import backbone_hidden, causal_lm_parts


class ChunkedConcatenatedForward:
    """Mixin for TRL's ORPO/CPO trainers (listed before them): `concatenated_forward` on chunked log-probs.

    Subclasses say what their TRL trainer computes: `nll_over` "attention" (ORPO: every real token of the
    chosen rows) or "labels" (CPO: the answer tokens, skipped when cpo_alpha is 0); `logits_shifted` (ORPO
    reports the logits of positions :-1, CPO of every position); `average_logps()`."""

    nll_over = "attention"
    logits_shifted = True

    def average_logps(self) -> bool:
        raise NotImplementedError

    def wants_nll(self) -> bool:
        return True

    def pad_value(self) -> int:
        """The input padding TRL's own concatenated_forward uses (ORPO: `padding_value`, CPO: `pad_token_id`)."""
        raise NotImplementedError

    def concatenated_forward(self, model, batch):
        unwrapped = self.accelerator.unwrap_model(model)
        backbone, head = causal_lm_parts(unwrapped)
        if (backbone is None or unwrapped is not model or self.is_encoder_decoder or self.aux_loss_enabled):
            return super().concatenated_forward(model, batch)
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.pad_value(),
                                       device=self.accelerator.device)
        ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]  # (2B, T)
        labels = cat["concatenated_labels"][:, 1:]  # (2B, T - 1): -100 outside the answers
        targets = ids[:, 1:]  # (2B, T - 1)
        answer = labels != -100
        if not torch.equal(labels[answer], targets[answer]):  # TRL's rows always agree; anything else: TRL's path
            return super().concatenated_forward(model, batch)
        n = batch["chosen_labels"].shape[0]
        hidden = backbone_hidden(backbone, ids, mask, pads_matter=True)  # (2B, T, H): the metrics read pads too
        # The kernel on the GPU; the CPU takes the reference even under Triton's interpreter (tests set it for the
        # kernel tests): interpreting it made a 12-step tiny ORPO run 35x slower (24 s of CPU vs 0.7 s)
        logp = chunked_logprobs(hidden[:, :-1], head.weight, targets,
                                use_triton=None if hidden.is_cuda else False)  # (2B, T - 1) fp32
        answer_f = answer.to(logp.dtype)
        sums = (logp * answer_f).sum(-1)  # (2B,)
        logps = sums / answer_f.sum(-1) if self.average_logps() else sums
        if self.wants_nll():
            scored = (mask[:, 1:] == 1) if self.nll_over == "attention" else answer  # (2B, T - 1)
            scored = scored[:n].to(logp.dtype)
            nll = -(logp[:n] * scored).sum() / scored.sum()
        else:
            nll = torch.tensor(0.0, device=self.accelerator.device)
        means = logit_means(hidden[:, :-1] if self.logits_shifted else hidden, head.weight)  # (2B, T', 1)
        return logps[:n], logps[n:], means[:n], means[n:], nll


@torch.no_grad()
def logit_means(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each position's mean logit over the vocabulary, h . mean_v(W): (B, T, 1) fp32. Its `.mean()` is the mean
    of the full (B, T, V) logits, which is all TRL reads from them (the `logits/chosen|rejected` metrics)."""
    mean_row = weight.mean(0, dtype=torch.float32).to(hidden.dtype)  # (H,): no fp32 copy of the (V, H) weight
    return (hidden @ mean_row).float().unsqueeze(-1)
