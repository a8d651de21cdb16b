"""Compile every kernel variant for an H100/H200 (sm_90) without a GPU; run as a script.

Triton's interpreter (how CI runs the kernels) executes Python, so it accepts code the compiler
rejects (types of loop-carried values, constexpr rules, ...). ``triton.compile`` needs no device,
only the ptxas bundled with triton, so this catches such errors on a CPU machine. It also checks
that the NF4 kernel launched with ``enable_fp_fusion=False`` has no fused multiply-add (which
would break bit-exactness with bitsandbytes). Must run without TRITON_INTERPRET (a fresh process).
"""

import importlib
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _module(name: str):
    return importlib.import_module(f"velotune.kernels.{name}")


def compile_kernel(kernel, types: dict, constexprs: dict, **options):
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options={"num_warps": 8, **options})


def main() -> None:
    rms, rope, glu = _module("rms_norm"), _module("rope"), _module("glu")
    ce, nf4, logprobs = _module("cross_entropy"), _module("nf4"), _module("logprobs")
    i64 = "i64"
    compile_kernel(
        rms._rms_norm_forward_kernel,
        dict(
            X="*bf16",
            W="*bf16",
            Y="*bf16",
            RSTD="*fp32",
            stride_x=i64,
            stride_y=i64,
            M="i32",
            D="i32",
            eps="fp32",
            offset="fp32",
        ),
        dict(BLOCK_M=32, BLOCK_D=128),
    )
    compile_kernel(
        rms._rms_norm_backward_kernel,
        dict(DY="*bf16", X="*bf16", W="*bf16", RSTD="*fp32", DX="*bf16", DW_PARTIAL="*fp32", stride_dy=i64,
             stride_x=i64, stride_dx=i64, M="i32", D="i32", offset="fp32", tiles_per_program="i32"),
        dict(BLOCK_M=1, BLOCK_D=4096),
    )  # fmt: skip
    strides = {k: i64 for k in "sx_b sx_h sx_t sy_b sy_h sy_t sc_b sc_t ss_b ss_t".split()}
    for backward in (False, True):
        compile_kernel(
            rope._rope_kernel,
            dict(X="*bf16", Y="*bf16", COS="*bf16", SIN="*bf16", T="i32", H="i32", HALF="i32", **strides),
            dict(BLOCK_H=32, BLOCK_R=64, BACKWARD=backward),
        )
        compile_kernel(
            logprobs._logprobs_chunk_kernel,
            dict(LOGITS="*bf16", IDS="*i64", LSE="*fp32", LOGP="*fp32", GRAD="*fp32", stride_l=i64, V="i32",
                 inv_temperature="fp32"),
            dict(BACKWARD=backward, BLOCK_V=4096),
        )  # fmt: skip
        for activation in (0, 1, 2):
            compile_kernel(
                glu._glu_kernel,
                dict(GATE="*bf16", UP="*bf16", OUT="*bf16", DOUT="*bf16", DGATE="*bf16", DUP="*bf16", n=i64),
                dict(ACT=activation, BACKWARD=backward, BLOCK=1024),
            )
    for softcap, grad in ((False, False), (True, True)):
        compile_kernel(
            ce._cross_entropy_chunk_kernel,
            dict(LOGITS="*bf16", LABELS="*i64", LOSS="*fp32", SCALE="*fp32", stride_l=i64, V="i32",
                 ignore_index="i32", softcap="fp32"),
            dict(HAS_SOFTCAP=softcap, COMPUTE_GRAD=grad, BLOCK_V=4096),
        )  # fmt: skip
    for nested, out, blocksize, even in ((True, "bf16", 64, True), (False, "fp16", 16, False),
                                         (True, "fp32", 4096, False)):  # fmt: skip
        compiled = compile_kernel(
            nf4._dequantize_nf4_kernel,
            dict(PACKED="*u8", ABSMAX="*u8" if nested else "*fp32", QUANT_MAP="*fp32", NESTED_ABSMAX="*fp32",
                 NESTED_MAP="*fp32", OFFSET="*fp32", OUT=f"*{out}", n="i32", n_bytes="i32", n_blocks="i32"),
            dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=256, NESTED=nested, OUT_BF16=out == "bf16",
                 ROWS=max(1, 4096 // blocksize), EVEN=even, IDX64=not even),
            enable_fp_fusion=False, num_warps=4,
        )  # fmt: skip
        if "fma.rn.f32" in compiled.asm["ptx"]:
            sys.exit("dequantize_nf4 kernel contains an FMA despite enable_fp_fusion=False")
    fp8_t, nf4_fp8_t = _module("fp8_transpose"), _module("nf4_fp8_transposed")  # the FP8 backward's layouts
    block_r, block_c, warps = fp8_t.DEFAULT_TILE
    compile_kernel(fp8_t._transpose_kernel, dict(X="*u8", Y="*u8", n_rows="i32", n_cols="i32", stride_r="i32",
                                                 stride_c="i32"),
                   dict(BLOCK_R=block_r, BLOCK_C=block_c, IDX64=False), num_warps=warps)  # fmt: skip
    block_r, block_c, warps = nf4_fp8_t.TILE
    compiled = compile_kernel(
        nf4_fp8_t._nf4_to_fp8_t_kernel,
        dict(PACKED="*u8", ABSMAX="*u8", QUANT_MAP="*fp32", NESTED_ABSMAX="*fp32", NESTED_MAP="*fp32", OFFSET="*fp32",
             INV_ROW="*fp32", OUT="*u8", n_rows="i32", row_blocks="i32"),
        dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=True, BLOCK_R=block_r, BLOCK_C=block_c, IDX64=True),
        enable_fp_fusion=False, num_warps=warps,
    )  # fmt: skip
    if "fma.rn.f32" in compiled.asm["ptx"]:
        sys.exit("nf4_fp8_transposed kernel contains an FMA despite enable_fp_fusion=False")
    nf4_fp8, fp8 = _module("nf4_fp8"), _module("fp8")  # NF4 -> e4m3 row-major (tiled), row quantization
    block_r, block_c, warps = nf4_fp8.ROW_TILE
    compiled = compile_kernel(
        nf4_fp8._nf4_to_fp8_rows_kernel,
        dict(PACKED="*u8", ABSMAX="*fp32", QUANT_MAP="*fp32", NESTED_ABSMAX="*fp32", NESTED_MAP="*fp32",
             OFFSET="*fp32", INV_ROW="*fp32", OUT="*fp8e4nv", n_rows="i32", row_blocks="i32"),
        dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=False, BLOCK_R=block_r, BLOCK_C=block_c, IDX64=True),
        enable_fp_fusion=False, num_warps=warps,
    )  # fmt: skip
    if "fma.rn.f32" in compiled.asm["ptx"]:
        sys.exit("nf4_fp8 row-major kernel contains an FMA despite enable_fp_fusion=False")
    for k, has_col in ((4096, True), (14336, False)):  # one pass (several rows a program), two passes
        one_pass, block, rows, warps = fp8._launch_shape(k)
        compile_kernel(
            fp8._quantize_rows_kernel,
            dict(X="*bf16", COL_SCALE="*fp32", Y="*fp8e4nv", SCALE="*fp32", n_rows="i32", n_cols="i32",
                 stride_x="i32", stride_y="i32"),
            dict(HAS_COL=has_col, BLOCK=block, ROWS=rows, ONE_PASS=one_pass, L2_HINTS=fp8._L2_HINTS),
            enable_fp_fusion=False, num_warps=warps,
        )  # fmt: skip
    stream = _module("nf4_gemv_stream")  # q/k/v-like + residual (OR look-ups), gate/up + norm + GLU (K tail)
    weight_types = {f"{name}{i}": kind for i in range(3) for name, kind in
                    (("P", "*i32"), ("A", "*u8"), ("NA", "*fp32"), ("NM", "*fp32"), ("OF", "*fp32"), ("QM", "*fp32"))}
    for glu, even in ((False, True), (True, False)):
        compile_kernel(
            stream._nf4_stream_kernel,
            dict(XP="*i32", OUT0="*bf16", OUT1="*bf16", OUT2="*bf16", **weight_types, N0="i32", N1="i32", N2="i32",
                 K="i32", KW="i32", T0="i32", T1="i32", NORM_P="*i32", eps="fp32", norm_offset="fp32", RES="*bf16"),
            dict(BN=8, BK=1024, BS=64, NBS=256, NESTED=True, EVEN_K=even, XKIND=0, NKIND=0, LOOKUP=2 if glu else 0,
                 PREFETCH=True, GLU=glu, ACT=0, NORM=glu, RESIDUAL=not glu),
            num_warps=4,
        )  # fmt: skip
    print("all kernels compiled for sm_90")


if __name__ == "__main__":
    main()
