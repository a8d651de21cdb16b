# Issue 16's peer rows: Unsloth's for_inference decode beside velotune's engine in one lease (8B shape, random
# weights, 128-token prompt, 256 new tokens, greedy), bf16 and NF4 at batch 1, bf16 at batch 8 and 16 (the
# GEMV row limit changed to 1 in 3c65467). Kind nvidia-h200, carry .peers and .bench; ~6 min.
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
mkdir -p $OUT/dec
[ -d /tmp/m_llama8b ] || timeout 150 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
timeout 200 python3 bench/bench_generate.py --only b1,b16,nf4 > $OUT/dec/velotune.log 2>&1; echo "velotune rc=$?"; grep -E "RESULT|tokens/s" $OUT/dec/velotune.log | tail -n 12
for spec in "unsloth none 1" "unsloth nf4 1" "unsloth none 16" "hf none 1"; do set -- $spec
  timeout 100 python3 .bench/peer_bench.py decode --model /tmp/m_llama8b --stack $1 --quant $2 --bs $3 --new 256 > $OUT/dec/$1_$2_$3.log 2>&1
  echo "$1 $2 bs$3 rc=$?"; grep RESULT $OUT/dec/$1_$2_$3.log || tail -n 15 $OUT/dec/$1_$2_$3.log
done
