"""GPU time and achieved bandwidth of each FP8 conversion kernel at Llama-8B shapes (M = 4,096 tokens).

Why a separate timer: `bench_fp8.py kernels` times whole Python calls back to back (`ms`), which for the
5-40 us conversions measures the host's launch cost as much as the kernel. Here each call is captured
`REPEAT` times into a CUDA graph and the graph replayed between CUDA events, so the figure is the GPU's
time a call (falling back to event timing of plain calls, said in the row, if capture fails). The
old-style wall time is kept beside it (`wall_ms`), comparable with BENCHMARKS.md's Session 9/10 rows.

Bandwidth counts the bytes a call must move at least (NF4: packed codes + block scales in, one byte a
value out; quantization: the activation in, one byte a value and a scale a row out; transpose: one byte
in and out), over the GPU time: the H200's ~4.8 TB/s is the ceiling. Repeated calls on the same tensors
let inputs under the 50 MB L2 stay cached (the 4096 x 4096 shapes), so those rows flatter the kernels.
Each row also sweeps the launch shapes (`*_sweep`: ms a call), bit-identity checked against the default.

  PYTHONPATH=$PWD/src python bench/bench_fp8.py conversions   (also run first by `kernels`)
"""

from __future__ import annotations

import json
import time

import torch

REPEAT = 20
M = 4096
DEVICE = "cuda"  # a CPU dry run of the code paths sets "cpu" (with TRITON_INTERPRET=1 and small shapes)
WEIGHTS = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down


def gpu_ms(fn) -> tuple[float, str]:
    """(GPU ms a call, how it was timed) of `fn` (a few kernel launches; allocations allowed)."""
    fn()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPEAT):
                fn()
        how, run, calls = "graph", graph.replay, REPEAT
    except Exception as exc:  # noqa: BLE001 - a launcher that cannot be captured: time plain calls
        how, run, calls = f"events ({type(exc).__name__})", fn, 1
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * calls), how


def wall_ms(fn, n=20) -> float:
    """Milliseconds a call of fn, its Python calls back to back (host launch cost included), after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.time() - start) / n * 1e3


def _timed(fn, nbytes: int) -> dict:
    ms, how = gpu_ms(fn)
    return dict(gpu_ms=round(ms, 4), gb_s=round(nbytes / ms / 1e6), wall_ms=round(wall_ms(fn), 4), timed_by=how)


def _nf4_rows(out_f: int, in_f: int) -> list[dict]:
    from velotune.kernels import nf4_fp8
    from velotune.kernels.nf4_fp8 import dequantize_nf4_to_fp8
    from velotune.quant.linear import to_linear4bit

    weight = to_linear4bit(torch.nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=torch.bfloat16)).weight
    n = out_f * in_f
    state = weight.quant_state
    nbytes = n // 2 + n // state.blocksize * state.absmax.element_size() + n  # codes + scales in, e4m3 out
    expected = dequantize_nf4_to_fp8(weight)[0].view(torch.uint8).clone()
    entry = nf4_fp8._CACHE[id(state)]  # the weight's cached launch, dropped to re-plan each tile
    sweep, default = {}, nf4_fp8.ROW_TILE
    for tile in [(16, 512, 4), (8, 1024, 4), (32, 256, 4), (16, 1024, 8), (32, 512, 8), (64, 512, 8)]:
        nf4_fp8.ROW_TILE, entry.launch = tile, None
        name = "{}x{}/{}".format(*tile)
        sweep[name] = round(gpu_ms(lambda: dequantize_nf4_to_fp8(weight))[0], 4)
        if not torch.equal(dequantize_nf4_to_fp8(weight)[0].view(torch.uint8), expected):
            sweep[name] = "DIFFERS"
    nf4_fp8.ROW_TILE, entry.launch = default, None
    reference = dequantize_nf4_to_fp8(weight, use_triton=False)[0].view(torch.uint8)  # fp32 dequant, PyTorch cast
    mismatches = int((expected != reference).sum())
    reference_t = reference.t().contiguous()
    mismatches_t = int((dequantize_nf4_to_fp8(weight, transposed=True)[0].view(torch.uint8) != reference_t).sum())
    rows = [dict(kernel="nf4_to_fp8 (row-major)", shape=f"{out_f}x{in_f}", mismatches_vs_reference=mismatches,
                 **_timed(lambda: dequantize_nf4_to_fp8(weight), nbytes), tile_sweep_ms=sweep),
            dict(kernel="nf4_to_fp8_t (transposed)", shape=f"{out_f}x{in_f}", mismatches_vs_reference=mismatches_t,
                 **_timed(lambda: dequantize_nf4_to_fp8(weight, transposed=True), nbytes))]
    return rows


def _quant_rows(n_rows: int, k: int, with_col: bool) -> dict:
    from velotune.kernels import fp8 as fp8_kernels
    from velotune.kernels.fp8 import quantize_fp8_rows

    x = torch.randn(n_rows, k, device=DEVICE, dtype=torch.bfloat16)
    col = torch.rand(k, device=DEVICE) + 0.5 if with_col else None
    nbytes = n_rows * k * (x.element_size() + 1) + n_rows * 4 + (k * 4 if with_col else 0)
    expected = quantize_fp8_rows(x, col)[0].view(torch.uint8).clone()
    saved = (fp8_kernels._PROGRAM_VALUES, fp8_kernels._THREAD_VALUES, fp8_kernels._ONE_PASS_COLS,
             fp8_kernels._LOOP_BLOCK, fp8_kernels._L2_HINTS)
    sweep = {}
    if k <= fp8_kernels._ONE_PASS_COLS:  # (values a program, values a thread): rows a program x warps
        variants = [(values, per_thread, saved[2], saved[3], saved[4]) for values, per_thread in
                    [saved[:2], (k, 32), (k, 16), (2 * k, 16), (2 * k, 64), (4 * k, 32), (8 * k, 32)]]
    else:  # two passes over BLOCK columns (L2 hints on and off), or one pass of the whole (padded) row
        variants = ([(saved[0], saved[1], saved[2], b, hints) for hints in (True, False) for b in (1024, 2048, 4096)]
                    + [(saved[0], saved[1], k, saved[3], saved[4])])
    for variant in variants:
        (fp8_kernels._PROGRAM_VALUES, fp8_kernels._THREAD_VALUES, fp8_kernels._ONE_PASS_COLS,
         fp8_kernels._LOOP_BLOCK, fp8_kernels._L2_HINTS) = variant
        one_pass, block, rows, warps = fp8_kernels._launch_shape(k)
        name = f"{'one' if one_pass else 'two'}_pass {rows}x{block}/{warps}w"
        name += "" if one_pass or variant[4] else " no L2 hints"
        if name in sweep:
            continue
        sweep[name] = round(gpu_ms(lambda: quantize_fp8_rows(x, col))[0], 4)
        if not torch.equal(quantize_fp8_rows(x, col)[0].view(torch.uint8), expected):
            sweep[name] = "DIFFERS"
    (fp8_kernels._PROGRAM_VALUES, fp8_kernels._THREAD_VALUES, fp8_kernels._ONE_PASS_COLS,
     fp8_kernels._LOOP_BLOCK, fp8_kernels._L2_HINTS) = saved
    name = "quantize_rows " + ("dY * s_W (backward)" if with_col else "x (forward)")
    y_ref, s_ref = fp8_kernels.quantize_fp8_rows_reference(x, col)  # PyTorch: IEEE division, then the cast
    y, s = quantize_fp8_rows(x, col)
    mismatches = dict(values=int((y.view(torch.uint8) != y_ref.view(torch.uint8)).sum()),
                      scales=int((s != s_ref).sum()))
    return dict(kernel=name, shape=f"{n_rows}x{k}", launch=list(fp8_kernels._launch_shape(k)),
                mismatches_vs_reference=mismatches,
                **_timed(lambda: quantize_fp8_rows(x, col), nbytes), sweep_ms=sweep)


def _transpose_row(out_f: int, in_f: int) -> dict:
    from velotune.kernels.fp8_transpose import transpose_bytes
    from velotune.quant.fp8 import quantize_weight_fp8

    values, _ = quantize_weight_fp8(torch.randn(out_f, in_f, device=DEVICE, dtype=torch.bfloat16))
    return dict(kernel="transpose_bytes (FP8 storage backward)", shape=f"{out_f}x{in_f}",
                **_timed(lambda: transpose_bytes(values), 2 * out_f * in_f))


def conversion_rows() -> list[dict]:
    """Every row printed as `RESULT_CONV {json}` as it is measured, and returned."""
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print("RESULT_CONV " + json.dumps(row), flush=True)

    for out_f, in_f in WEIGHTS:
        for row in _nf4_rows(out_f, in_f):
            emit(row)
    for k in (4096, 14336):  # the forward's x: hidden size, and down_proj's input
        emit(_quant_rows(M, k, with_col=False))
    for k in (4096, 1024, 14336):  # the backward's dY: q/o and down, k/v, gate/up
        emit(_quant_rows(M, k, with_col=True))
    for out_f, in_f in WEIGHTS:
        emit(_transpose_row(out_f, in_f))
    return rows
