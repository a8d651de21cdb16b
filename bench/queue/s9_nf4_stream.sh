# H3 (session 9, issue 16's NF4 target): kernels/nf4_gemv_stream.py on the H200. Run from the repo root with
# export PYTHONPATH=$PWD/src:$PWD/.peers and carry [".peers"] (bitsandbytes for the gemv_4bit baseline).
# PART=1 (default, about 5 min): the per-group sweep (10 launch shapes x q/k/v, o, gate/up + SwiGLU, down at one
#   row, gemv_4bit and kernels/nf4_gemv.py beside; then each group's best shape with the decode path's fusion:
#   RMSNorm prologue / residual epilogue), `STREAM ...` summary lines at the end; then the kernel's tests on the GPU
#   and the engine at one row through it (CUDA graph == eager bit for bit, fp32 greedy == plain path).
# PART=2 (about 3-4 min): 8B NF4 batch-1 decode, gemv_4bit path vs our stream kernel at one row (`nf4own`), step times.
# What to do with it: if a group's best beats gemv_4bit, put that shape in kernels/nf4_gemv_stream.CONFIG and,
# if the nf4own row beats the nf4 row, flip fast/decode_linear.OWN_NF4_GEMV_AT_ONE_ROW to True (BENCHMARKS.md row).
mkdir -p "$OUT"
if [ "${PART:-1}" = 1 ]; then
  timeout 270 python3 bench/bench_gemv.py --kinds nf4stream > "$OUT/h3_nf4stream_sweep.txt" 2>&1; echo "rc=$?" >> "$OUT/h3_nf4stream_sweep.txt"
  timeout 150 python3 -m pytest -q tests/kernels/test_nf4_gemv_stream.py "tests/inference/test_gpu.py::test_nf4_stream_gemv_decode_at_one_row" -p no:cacheprovider > "$OUT/h3_stream_tests.txt" 2>&1; echo "rc=$?" >> "$OUT/h3_stream_tests.txt"
fi
if [ "${PART:-1}" = 2 ]; then
  timeout 300 python3 bench/bench_generate.py --only nf4,nf4own,step > "$OUT/h3_nf4_decode.txt" 2>&1; echo "rc=$?" >> "$OUT/h3_nf4_decode.txt"
fi
