"""Device functions shared by the row-softmax kernels (cross-entropy, per-token log-probs).

Why: both kernels stream one row of logits through the vocabulary twice: once for an online
log-sum-exp (running max and rescaled sum of exponentials, so a row never has to fit in
registers), once to overwrite the row with the softmax gradient. They differ only in what is done
to the raw logits (Gemma 2's tanh soft-cap for the loss, a sampling temperature for the log-probs)
and in what scales the gradient (1 / num_items for the loss, upstream / temperature for the
log-probs), and in two details that each kernel keeps as it always was (how lanes past V are
masked, the sign convention of the gradient), so those are the arguments here: constexpr flags
that drop the unused arithmetic at compile time, and scalars. Triton inlines device functions:
when this module replaced the two hand-written loops, every variant of both kernels compiled to
the same sm_90 PTX as before (debug info aside) and gave bit-identical results in the interpreter.

Everything is fp32 whatever the logits' dtype. Not kernels: nothing here is launched by itself.
"""

from ._triton import jit, tl


@jit
def transformed_logits(raw, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr):
    """The logits the softmax sees, fp32, and t = tanh(raw / softcap) for the soft-cap derivative.

    Soft-cap first (it is part of the model, Gemma 2's final_logit_softcapping), then the sampling
    temperature (applied by the caller of the model). tanh(u) is written 2 / (1 + exp(-2u)) - 1:
    exact at both tails in fp32, where exp-based forms of tanh overflow to nan. Without a soft-cap,
    t is the logit itself and must not be used.
    """
    z = raw.to(tl.float32)  # same shape as raw
    t = z
    if HAS_SOFTCAP:
        t = 2.0 / (1.0 + tl.exp(-2.0 * z / softcap)) - 1.0
        z = softcap * t
    if HAS_TEMPERATURE:
        z = z * inv_temperature
    return z, t


@jit
def online_logsumexp(
    row_ptr, V, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, MASK_AFTER_TRANSFORM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """log sum_v exp(z_v) of one row of V logits (after the transform), fp32, in one pass.

    Keeps a running max m and the sum d of exp(z - m); a new block with a larger max rescales d
    by exp(m_old - m_new). Lanes past V must end as -inf, adding exp(-inf) = 0. A soft-cap would
    turn a loaded -inf into -softcap, so with MASK_AFTER_TRANSFORM they are loaded as 0 and set to
    -inf after the transform (required with HAS_SOFTCAP). Otherwise they are loaded as -inf, which
    a positive temperature keeps: one select less per logit, and the compiler may fuse
    z * inv_temperature - m into one FMA (the log-prob kernel always compiled so).
    """
    tl.static_assert(MASK_AFTER_TRANSFORM or not HAS_SOFTCAP, "a soft-cap needs MASK_AFTER_TRANSFORM")
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        mask = offs < V
        if MASK_AFTER_TRANSFORM:
            raw = tl.load(row_ptr + offs, mask=mask, other=0.0)  # (BLOCK_V,)
        else:
            raw = tl.load(row_ptr + offs, mask=mask, other=float("-inf"))  # (BLOCK_V,)
        z, _ = transformed_logits(raw, inv_temperature, softcap, HAS_SOFTCAP, HAS_TEMPERATURE)  # (BLOCK_V,) fp32
        if MASK_AFTER_TRANSFORM:
            z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m + tl.log(d)


@jit
def store_softmax_grad(
    row_ptr, V, target, lse, coef, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, OF_LOGP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Overwrite one row of raw logits with coef * d(-log p_target)/d raw (OF_LOGP=False: a loss)
    or coef * d(log p_target)/d raw (OF_LOGP=True: a log-prob), i.e. coef * (softmax - onehot)
    or coef * (onehot - softmax), times d(soft-cap)/d raw = 1 - t^2 when soft-capped.

    The sign is a flag rather than folded into coef because -(a - b) and (b - a) differ in the sign
    of an exact zero (an underflowed softmax): each kernel keeps the bits it always produced. The
    temperature's own factor 1/T is left to coef (one multiply per row, not per logit). ``lse`` is
    the row's log-sum-exp from ``online_logsumexp``. Stored in the logits' dtype, so the caller's
    two gradient matmuls read it in place.
    """
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        mask = offs < V
        z, t = transformed_logits(
            tl.load(row_ptr + offs, mask=mask, other=0.0), inv_temperature, softcap, HAS_SOFTCAP, HAS_TEMPERATURE
        )  # (BLOCK_V,) fp32 each
        if OF_LOGP:
            grad = tl.where(offs == target, 1.0, 0.0) - tl.exp(z - lse)  # (BLOCK_V,)
        else:
            grad = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)  # (BLOCK_V,)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        tl.store(row_ptr + offs, (grad * coef).to(row_ptr.dtype.element_ty), mask=mask)
