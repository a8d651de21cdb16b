# Issue 18 item 3 in one lease: the FP8 rows beside Unsloth's. One nvidia-h200; carry .peerspack and .bench
# (README.md). Writes $OUT/s20_fp8_$PART.tgz.
# PART=1 (~5 min): the 8B 2K rows on the default plan (velotune NF4+FP8, FP8 storage; Unsloth QLoRA, bf16 LoRA).
# PART=2 (~6 min): the 1B 2K rows and the 8B 32K rows of both stacks (issue18_fp8.sh PART=3).
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s20_fp8; mkdir -p $O
{ git log --oneline -1; git status --short; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $O/commit.txt
if [ "${PART:-1}" = 1 ]; then
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing | tail -1
for mode in nf4-fp8 fp8; do
  timeout 100 python bench/bench_fp8.py speed --model /tmp/m_llama8b --mode $mode --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 > $O/llama8b_velotune_${mode}_2048.log 2>&1
  echo "velotune $mode rc=$?"; grep RESULT $O/llama8b_velotune_${mode}_2048.log || tail -n 25 $O/llama8b_velotune_${mode}_2048.log
done
OUT=$O PER_RUN_S=100 timeout 230 bash .bench/run_peers.sh llama8b 2048 unsloth/nf4 unsloth/none
else
OUT=$O PART=3 bash bench/queue/issue18_fp8.sh > $O/part3.log 2>&1  # writes under $O/h4
cat $O/part3.log
fi
cd $OUT && tar czf s20_fp8_${PART:-1}.tgz s20_fp8 && rm -rf s20_fp8
