# HF (issue 18 item 3: the FP8 conversion kernels' overhead), session 11. Run from the repo root at HF's last commit
# (or later); carry .peers (and .bench for PART=2). One GPU. PART=1 (~5 min: many launch shapes compile once): the FP8 GPU tests (bit for bit at size,
# the new kernels compiled for sm_90) and `bench_fp8.py kernels` (each conversion's GPU time and GB/s via CUDA-graph
# replay, launch-shape sweeps, then the per-projection pieces). PART=2 (optional, ~2.5 min): one profiled NF4+FP8
# 8B micro-batch (the per-kernel sums to set beside session 10's fp8_profile_nf4-fp8.log: _nf4_to_fp8_kernel was
# 16.7 ms / 416 calls, _nf4_to_fp8_t_kernel 10.6 / 224, _quantize_rows_kernel 17.9 / 448) and the nf4-fp8 / fp8
# speed rows. Unset PART runs PART=1 only.
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/hf
git log --oneline -1 > $OUT/hf/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/hf/commit.txt
if [ "${PART:-1}" = 1 ]; then
timeout 240 python -m pytest -q -p no:cacheprovider --durations=10 tests/fast/test_fp8_gpu.py tests/kernels/test_fp8_kernels.py > $OUT/hf/tests_gpu.log 2>&1; echo "fp8 gpu tests rc=$?"; tail -n 25 $OUT/hf/tests_gpu.log
timeout 360 python bench/bench_fp8.py kernels > $OUT/hf/kernels.log 2>&1; echo "kernels rc=$?"; grep RESULT $OUT/hf/kernels.log || tail -n 30 $OUT/hf/kernels.log
fi
if [ "${PART:-}" = 2 ]; then
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
timeout 150 python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode nf4-fp8 --seq 2048 --bs 2 --ga 4 --steps 2 --warmup 1 --profile > $OUT/hf/fp8_profile_nf4-fp8.log 2>&1
echo "profile rc=$?"; grep -E "PROFILE|_kernel|_scaled_mm" $OUT/hf/fp8_profile_nf4-fp8.log | head -n 20
for mode in nf4-fp8 fp8; do
  timeout 100 python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode $mode --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 > $OUT/hf/llama8b_velotune_${mode}_2048.log 2>&1
  echo "velotune $mode rc=$?"; grep RESULT $OUT/hf/llama8b_velotune_${mode}_2048.log || tail -n 25 $OUT/hf/llama8b_velotune_${mode}_2048.log
done
fi
