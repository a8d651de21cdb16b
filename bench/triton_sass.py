"""Our FP8 conversion kernels compiled for sm_90 (H100/H200) on a machine without a GPU, their SASS counted.

Why: GPU time is scarce, and these kernels' cost is mostly instructions a value (they run 2-4x under the
H200's bandwidth). Triton compiles for a GPU target without one (`triton.compile(..., target=GPUTarget)`)
and ships ptxas/cuobjdump, so the instructions a value, the gathers, the shared-memory layout conversions
and the barriers of a kernel can be read before a lease; the lease then confirms with
`bench_fp8.py conversions`. Integer and pointer arguments are marked divisible by 16, as Triton's launcher
specializes them for 8B shapes and aligned tensors (without it, loads and stores are not vectorized).

Counts are static (each instruction once; the unexecuted slow path of an IEEE division included), so
compare kernels by them, do not read them as a time. Use the GPU machine's Triton for its code:
`pip install --no-deps --target /tmp/tri36 triton==3.6.0` then `PYTHONPATH=/tmp/tri36:src python bench/triton_sass.py`.

  PYTHONPATH=src python bench/triton_sass.py [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

NF4_ARGS = {"PACKED": "*u8", "ABSMAX": "*u8", "QUANT_MAP": "*fp32", "NESTED_ABSMAX": "*fp32", "NESTED_MAP": "*fp32",
            "OFFSET": "*fp32", "INV_ROW": "*fp32"}
QUANT_ARGS = {"X": "*bf16", "COL_SCALE": "*fp32", "Y": "*fp8e4nv", "SCALE": "*fp32", "n_rows": "i32", "n_cols": "i32",
              "stride_x": "i32", "stride_y": "i32"}
NF4_META = dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=True, IDX64=False)


def kernels() -> list[tuple[str, object, dict, dict, int, int]]:
    """(name, kernel, signature, constexprs, num_warps, values a program) at the 8B launch shapes."""
    from velotune.kernels import fp8, nf4_fp8, nf4_fp8_transposed
    from velotune.kernels.fp8_transpose import DEFAULT_TILE, _transpose_kernel

    br, bc, warps = nf4_fp8.ROW_TILE
    tr, tc, twarps = nf4_fp8_transposed.TILE
    out = [("nf4_to_fp8 row-major tiled", nf4_fp8._nf4_to_fp8_rows_kernel,
            {**NF4_ARGS, "OUT": "*fp8e4nv", "n_rows": "i32", "row_blocks": "i32"},
            dict(NF4_META, BLOCK_R=br, BLOCK_C=bc), warps, br * bc),
           ("nf4_to_fp8 flat (blocks straddling rows)", nf4_fp8._nf4_to_fp8_kernel,
            {**NF4_ARGS, "OUT": "*fp8e4nv", "n": "i32", "n_bytes": "i32", "n_blocks": "i32", "n_cols": "i32"},
            dict(NF4_META, ROWS=nf4_fp8._TILE_VALUES // 64), nf4_fp8._NUM_WARPS, nf4_fp8._TILE_VALUES),
           ("nf4_to_fp8 transposed", nf4_fp8_transposed._nf4_to_fp8_t_kernel,
            {**NF4_ARGS, "OUT": "*u8", "n_rows": "i32", "row_blocks": "i32"},
            dict(NF4_META, BLOCK_R=tr, BLOCK_C=tc), twarps, tr * tc)]
    for k in (4096, 1024, 14336):
        one_pass, block, rows, qwarps = fp8._launch_shape(k)
        for has_col in (False, True):
            out.append((f"quantize_rows {k} cols{' x col scale' if has_col else ''}", fp8._quantize_rows_kernel,
                        QUANT_ARGS, dict(HAS_COL=has_col, BLOCK=block, ROWS=rows, ONE_PASS=one_pass,
                                                     L2_HINTS=fp8._L2_HINTS), qwarps,
                        rows * block if one_pass else 2 * block))  # two passes: per loop iteration, both loops
    r, c, w = DEFAULT_TILE
    out.append(("transpose_bytes", _transpose_kernel, {"X": "*u8", "Y": "*u8", "n_rows": "i32", "n_cols": "i32",
                                                       "stride_r": "i32", "stride_c": "i32"},
                dict(BLOCK_R=r, BLOCK_C=c, IDX64=False, stride_c=1), w, r * c))  # Triton specializes a 1
    return out


def sass_of(kernel, signature: dict, constexprs: dict, num_warps: int, dump: Path | None, name: str) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{c: "constexpr" for c in constexprs}}  # (an argument equal to 1 is one too)
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t != "constexpr"}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, enable_fp_fusion=False))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = (dump or Path("/tmp")) / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    if dump:
        cubin.with_suffix(".sass").write_text(sass)
        cubin.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
    else:
        cubin.unlink()
    return sass


def summary(sass: str, values: int, threads: int) -> dict:
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
    memory = collections.Counter(op for op in ops if op.startswith(("LDG", "STG", "LDS", "STS", "LDSM", "STSM")))
    return dict(instructions=len(ops), per_value=round(len(ops) * threads / values, 1),
                barriers=sum(op.startswith("BAR") for op in ops), memory=dict(memory))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", type=Path, help="write each kernel's SASS, TTGIR and cubin here")
    args = ap.parse_args(argv)
    import triton

    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, sm_90")
    for name, kernel, signature, constexprs, warps, values in kernels():
        sass = sass_of(kernel, signature, constexprs, warps, args.dump, name)
        print(f"{name}: {summary(sass, values, 32 * warps)}")


if __name__ == "__main__":
    main()
