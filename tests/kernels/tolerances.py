"""The one tolerance table of the kernel tests, and the comparison helper that reads it.

Base rule (DESIGN.md section 5): fp32 atol/rtol about 1e-5..1e-4; bf16 atol <= 2e-1, rtol <= 5e-2.
Any looser entry says why next to it.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


BASE = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-4),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
    torch.float16: Tolerance(atol=5e-3, rtol=5e-3),
}

# (op, dtype) -> tolerance, where an op needs something other than BASE.
OVERRIDES = {
    # Weight gradients are sums over every row (token); fp32 summation order differs between the
    # per-program partial sums and torch's reduction, so absolute error grows with the row count.
    ("rms_norm.dweight", torch.float32): Tolerance(atol=1e-4, rtol=1e-4),
    # bf16: the kernel rounds once from fp32, the reference rounds after every torch op, so the two
    # differ by up to a few bf16 ulps (1 ulp = 2**-8 relative) on values of size ~1..10.
    ("rms_norm.dweight", torch.bfloat16): Tolerance(atol=1e-1, rtol=5e-2),
    ("rope", torch.bfloat16): Tolerance(atol=3e-2, rtol=2e-2),
    ("glu", torch.bfloat16): Tolerance(atol=3e-2, rtol=2e-2),
    # Cross-entropy: the loss is an fp32 log-sum-exp of bf16 logits. Its gradients are compared
    # after dividing both sides by the reference's largest magnitude (they scale like 1/N, so a
    # fixed atol would mean nothing at large N); bf16 logits of d loss/d logits are rounded once
    # (to 2**-9 relative) before the two bf16 matmuls, hence 1e-2 of the largest value.
    ("cross_entropy.loss", torch.bfloat16): Tolerance(atol=2e-2, rtol=1e-2),
    ("cross_entropy.grad", torch.bfloat16): Tolerance(atol=1e-2, rtol=5e-2),
    ("logprobs", torch.bfloat16): Tolerance(atol=5e-2, rtol=2e-2),
    ("logprobs.grad", torch.bfloat16): Tolerance(atol=1e-2, rtol=5e-2),  # normalised as above
}


def tolerance(op: str, dtype: torch.dtype) -> Tolerance:
    return OVERRIDES.get((op, dtype), BASE[dtype])


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, op: str, dtype: torch.dtype, normalise: bool = False
) -> None:
    """assert_close with the table's tolerance for (op, dtype); compares in fp32.

    ``normalise`` divides both by the largest magnitude of ``expected`` first (for gradients whose
    scale shrinks with the token count).
    """
    tol = tolerance(op, dtype)
    if normalise:
        peak = expected.float().abs().max().clamp(min=1e-30)
        actual, expected = actual.float() / peak, expected.float() / peak
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"[{op}, {dtype}] {m}"
    )
