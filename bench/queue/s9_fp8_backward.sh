# H4 (session 9, issue 18): the FP8 backward's transposed copies by our kernels (kernels/fp8_transpose.py,
# kernels/nf4_fp8_transposed.py). nvidia-h200, ~1.5 min (every timeout hit: 4 min). Run from the repo root; carry .peers.
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers PYTHONUNBUFFERED=1
mkdir -p $OUT/h4_bwd
git log --oneline -1 > $OUT/h4_bwd/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h4_bwd/commit.txt
# 1. compiled kernels bit for bit vs .t().contiguous() at 8B shapes, and the FP8 GEMM tests through them (~40 s)
timeout 120 python -m pytest -q -p no:cacheprovider tests/fast/test_fp8_gpu.py tests/kernels/test_fp8_kernels.py \
  -k "backward_layouts or transpose or transposed or fp8_weight or gemms" > $OUT/h4_bwd/tests.log 2>&1
echo "tests rc=$?"; tail -n 8 $OUT/h4_bwd/tests.log
# 2. one projection's pieces at 8B shapes, M = 4096: new transposes (and the tile sweep) beside the old ones,
#    FP8 / NF4-FP8 backward new vs old, beside bf16 (~45 s)
timeout 120 python bench/bench_fp8.py kernels > $OUT/h4_bwd/kernels.log 2>&1
echo "kernels rc=$?"; grep RESULT $OUT/h4_bwd/kernels.log || tail -n 20 $OUT/h4_bwd/kernels.log
