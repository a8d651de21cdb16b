"""Count what the NF4 GEMV kernels' K loops cost on sm_90, without a GPU: registers and SASS per weight byte.

Why: device time is scarce, and the NF4 GEMV's speed at batch 1 is set by how many instructions each
weight byte costs, how many registers (programs per SM, bytes in flight) and how many barriers a K step
needs, all of which the compiled kernel shows. `triton.compile` targets sm_90 on a CPU machine with the
ptxas/nvdisasm bundled with Triton. Layouts (and so these counts) change between Triton versions: count
with the GPU machine's (3.6: `pip install --target DIR triton==3.6.0`, then `--triton-dir DIR`).

    PYTHONPATH=src python bench/nf4_gemv_sass.py [--triton-dir DIR] [--config 8,1024,4,2,1 ...]

Prints one line per kernel variant: registers, spill bytes, instructions in the K loop, per weight byte,
and the loop's barriers and shared-memory loads (layout changes). kernels/nf4_gemv_stream.py at each
--config (BLOCK_N, BLOCK_K, warps, LOOKUP, PREFETCH; q/k/v-like: three weights, bf16 x, K a multiple of
BLOCK_K) and kernels/nf4_gemv.py at its default for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def _compile(kernel, types: dict, constexprs: dict, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    # what Triton's launch specialization gives the real call: 16-byte aligned pointers, K / K-words % 16 == 0
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in ("K", "KW", "KH")}
    source = ASTSource(kernel, signature, constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _loop_counts(sass: str) -> collections.Counter:
    """Opcode counts of the first loop (a backward conditional branch to a label above it)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    for i, line in enumerate(lines):
        m = re.search(r"@!?P\d BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            ops = collections.Counter()
            for body in lines[labels[m.group(1)]:i + 1]:
                op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]+)", body)
                if op:
                    ops[op.group(1)] += 1
            return ops
    return collections.Counter()


def report(label: str, compiled, loop_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ops = _loop_counts(sass)
    total = sum(ops.values())
    print(f"{label}: registers {regs and regs.group(1)}, spill {stack and stack.group(1)} B, loop {total} "
          f"instructions = {total / loop_bytes:.1f} a weight byte, {ops['BAR']} barriers, {ops['LDS']} LDS, "
          f"{ops['LDG']} LDG", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton-dir", help="a directory holding another Triton (pip install --target DIR triton==X)")
    ap.add_argument("--config", action="append", help="BLOCK_N,BLOCK_K,warps,LOOKUP,PREFETCH (repeatable)")
    args = ap.parse_args()
    if args.triton_dir:
        sys.path.insert(0, args.triton_dir)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from velotune.kernels import nf4_gemv, nf4_gemv_stream

    print("triton", triton.__version__, flush=True)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config or []]
    configs = configs or [tuple(int(v) for v in c) for c in dict.fromkeys(nf4_gemv_stream.CONFIG.values())]
    types = dict(XP="*i32", OUT0="*bf16", OUT1="*bf16", OUT2="*bf16", N0="i32", N1="i32", N2="i32", K="i32",
                 KW="i32", T0="i32", T1="i32", NORM_P="*i32", eps="fp32", norm_offset="fp32", RES="*bf16")
    for bn, bk, warps, lookup, prefetch in configs:
        for i in range(3):
            types.update({f"P{i}": "*i32", f"A{i}": "*u8", f"NA{i}": "*fp32", f"NM{i}": "*fp32", f"OF{i}": "*fp32",
                          f"QM{i}": "*i64" if lookup == 1 else "*fp32"})
        constexprs = dict(BN=bn, BK=bk, BS=64, NBS=256, NESTED=True, EVEN_K=True, XKIND=0, NKIND=0, LOOKUP=lookup,
                          PREFETCH=bool(prefetch), GLU=False, ACT=0, NORM=False, RESIDUAL=False)
        compiled = _compile(nf4_gemv_stream._nf4_stream_kernel, types, constexprs, warps)
        threads = 32 * warps
        report(f"nf4_gemv_stream {bn},{bk},{warps},{lookup},{int(bool(prefetch))}", compiled, bn * bk // 2 // threads)
    old = dict(X="*bf16", OUT0="*bf16", OUT1="*bf16", OUT2="*bf16", M="i32", N0="i32", N1="i32", N2="i32", K="i32",
               KH="i32", T0="i32", T1="i32", NORM_W="*bf16", eps="fp32", norm_offset="fp32", RES="*bf16")
    bn, bk, warps, pairs = nf4_gemv.CONFIG["dense"]
    for i in range(3):
        old.update({f"P{i}": "*u8", f"A{i}": "*u8", f"NA{i}": "*fp32", f"NM{i}": "*fp32", f"OF{i}": "*fp32",
                    f"QM{i}": "*i64" if pairs else "*fp32"})
    constexprs = dict(MP=1, BN=bn, BK=bk, BS=64, NBS=256, NESTED=True, EVEN_K=True, PAIRS=pairs, GLU=False, ACT=0,
                      NORM=False, RESIDUAL=False)
    report(f"nf4_gemv {bn},{bk},{warps},{pairs}", _compile(nf4_gemv._nf4_gemv_kernel, old, constexprs, warps),
           bn * bk // 2 // (32 * warps))


if __name__ == "__main__":
    main()
