# H4 (issue 18 items 1-3: FP8 compute). Run from the repo root at H4's last commit (or later); carry .bench and .peers.
# Parts, so they can go in separate device calls: PART=1 (tests, kernel pieces incl. the backward transposes, convergence:
# ~3.5 min) and PART=2 (8B 2K speed rows beside Unsloth: ~5 min); unset PART runs both (~8 min; every timeout hit: 13 min).
# PART=3 (optional, ~6 min alone): the 1B 2K rows and the 8B 32K rows.
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/h4
git log --oneline -1 > $OUT/h4/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h4/commit.txt
if [ "${PART:-1}" = 1 ] || [ -z "${PART:-}" ]; then
# 1. GPU tests + the kernel tests compiled (~60 s)
timeout 120 python -m pytest -q -p no:cacheprovider tests/fast/test_fp8_gpu.py tests/kernels/test_fp8_kernels.py > $OUT/h4/tests_gpu.log 2>&1; echo "gpu tests rc=$?"; tail -n 15 $OUT/h4/tests_gpu.log
# 1b. the pieces of one projection's FP8 GEMMs at 8B shapes vs bf16, old vs new backward transposes (~45 s)
timeout 120 python bench/bench_fp8.py kernels > $OUT/h4/kernels.log 2>&1; echo "kernels rc=$?"; grep RESULT $OUT/h4/kernels.log || tail -n 20 $OUT/h4/kernels.log
# 1c. convergence: Llama-3.2-1B shape (random weights as the peers' harness makes them, a 16K BPE tokenizer trained
#     on the text), real text = the Python standard library's .py files (every 10th file held out), LoRA r=16 on all
#     projections, 200 steps of 4 x 512 tokens, cosine lr 5e-4, bf16 vs FP8 storage+compute vs NF4+FP8 compute (~90 s)
timeout 180 python bench/bench_fp8.py converge --model llama1b --modes bf16,fp8,nf4-fp8 --steps 200 --bs 4 --seq 512 --rank 16 --lr 5e-4 --out $OUT/h4/converge > $OUT/h4/converge.log 2>&1
echo "converge rc=$?"; grep -v Writing $OUT/h4/converge.log | tail -n 8
fi
if [ "${PART:-2}" = 2 ] || [ -z "${PART:-}" ]; then
# 2. speed, 8B shape, 2K tokens, batch 2 x accumulation 4 (the peers' harness loop; ~5 min)
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
for mode in nf4-fp8 fp8; do
  timeout 100 python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode $mode --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 > $OUT/h4/llama8b_velotune_${mode}_2048.log 2>&1
  echo "velotune $mode rc=$?"; grep RESULT $OUT/h4/llama8b_velotune_${mode}_2048.log || tail -n 25 $OUT/h4/llama8b_velotune_${mode}_2048.log
done
OUT=$OUT/h4 PER_RUN_S=100 timeout 330 bash .bench/run_peers.sh llama8b 2048 unsloth/nf4 unsloth/none velotune/nf4
fi
if [ "${PART:-}" = 3 ]; then
# 3. optional (only if device time is left; ~6 min): the 1B rows at 2K and the 8B 32K rows (bs 1 x ga 1), same loop
[ -d /tmp/m_llama1b ] || timeout 90 python .bench/peer_bench.py make --out /tmp/m_llama1b --preset llama1b 2>&1 | grep -v Writing
for mode in nf4-fp8 fp8; do
  timeout 90 python bench/bench_fp8.py speed --model /tmp/m_llama1b --mode $mode --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 > $OUT/h4/llama1b_velotune_${mode}_2048.log 2>&1
  echo "velotune 1b $mode rc=$?"; grep RESULT $OUT/h4/llama1b_velotune_${mode}_2048.log || tail -n 25 $OUT/h4/llama1b_velotune_${mode}_2048.log
done
OUT=$OUT/h4 PER_RUN_S=90 timeout 200 bash .bench/run_peers.sh llama1b 2048 unsloth/nf4 unsloth/none
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
for mode in nf4-fp8 fp8; do
  timeout 150 python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode $mode --seq 32768 --bs 1 --ga 1 --steps 3 --warmup 1 > $OUT/h4/llama8b_velotune_${mode}_32768.log 2>&1
  echo "velotune 8b 32K $mode rc=$?"; grep RESULT $OUT/h4/llama8b_velotune_${mode}_32768.log || tail -n 25 $OUT/h4/llama8b_velotune_${mode}_32768.log
done
OUT=$OUT/h4 PER_RUN_S=150 EXTRA="--bs 1 --ga 1" timeout 320 bash .bench/run_peers.sh llama8b 32768 unsloth/nf4 unsloth/none
fi
