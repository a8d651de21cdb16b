# H5 (issue 18 items 4-5: dynamic 4-bit, load_in_8bit). Run from the repo root at H5's last commit (or later); carry .peers.
# Expected ~10 min in all (every timeout hit: 17 min). Parts: PART=1 (tests + Unsloth load, ~4 min), PART=2 (bench rows, ~6 min).
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/h5
git log --oneline -1 > $OUT/h5/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h5/commit.txt
if [ "${PART:-1}" = 1 ] || [ -z "${PART:-}" ]; then
# 1. GPU tests: load_in_8bit (SmolLM2-shaped random model) -> LoRA steps lower the loss -> merged_16bit (+ its check)
#    -> GGUF q8_0 (+ its check); a dynamic 4-bit folder written on the GPU loads in velotune and transformers (~2-3 min)
timeout 400 python -m pytest -q -p no:cacheprovider -rs tests/quant/test_int8_gpu.py --durations=5 > $OUT/h5/tests_gpu.log 2>&1; echo "gpu tests rc=$?"; tail -n 25 $OUT/h5/tests_gpu.log
# 1b. Unsloth (peer) loads the dynamic 4-bit folder: kept layers 16-bit, the rest Linear4bit, logits = velotune's (~1-2 min)
timeout 300 python bench/dynamic4_peer_load.py /tmp/h5_dyn4 > $OUT/h5/unsloth_load.log 2>&1; echo "unsloth load rc=$?"; grep -E "RESULT|WRITTEN" $OUT/h5/unsloth_load.log || tail -n 40 $OUT/h5/unsloth_load.log
fi
if [ "${PART:-2}" = 2 ] || [ -z "${PART:-}" ]; then
# 2. 8-bit bench row beside bf16 and NF4 of the same model: Llama-3.2-1B shape, random weights, LoRA r=32 on all
#    projections, 2048 tokens x batch 2 x accumulation 4, "unsloth" checkpointing; int8 runs the plain path (the fused
#    path takes Linear / NF4 layers only), so bf16 and NF4 are given on both paths (~1 min each)
for spec in "int8 plain" "none plain" "nf4 plain" "none fast" "nf4 fast"; do
  set -- $spec
  timeout 150 python bench/bench_train.py --shape llama1b --quant $1 --path $2 --seq 2048 --batch 2 --accum 4 --steps 3 --warmup 1 > $OUT/h5/bench_1b_$1_$2.log 2>&1
  echo "bench 1b $1 $2 rc=$?"; grep RESULT $OUT/h5/bench_1b_$1_$2.log || tail -n 25 $OUT/h5/bench_1b_$1_$2.log
done
fi
