# H2 (session 9, issue 20): Qwen2-VL / Qwen2.5-VL on velotune's own Qwen2 decoder. Kind: nvidia-h200. ~11 min
# in all: PART=1 ~2 min (GPU tests); PART=2 ~5 min (make the Qwen2.5-VL-7B shape + the QLoRA rows: velotune,
# velotune-hf = velotune with transformers' text decoder, Unsloth); PART=3 ~4 min (the bf16 LoRA rows; needs
# PART=2's /tmp/v_qwen on the same warm machine, else it makes it again, +1 min). Unset PART runs all (>10 min:
# only where one call may run that long). Every timeout hit: PART=2 11.5 min, PART=3 7.5 min.
# Run from the repo root; carry .peers (Unsloth, TRL, bitsandbytes for the Unsloth rows).
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/h2
git log --oneline -1 > $OUT/h2/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h2/commit.txt
if [ "${PART:-}" = 1 ] || [ -z "${PART:-}" ]; then
# 1. GPU tests (~90 s): NF4 load + LoRA step on CUDA (now through our decoder for qwen2_5_vl), and our decoder's
#    compiled fast path (fused LoRA over bf16 / NF4, fused cross-entropy, offloaded checkpoints) vs its plain path
timeout 240 python -m pytest -q -p no:cacheprovider tests/vision/test_gpu.py tests/vision/test_vision_own_decoder.py > $OUT/h2/tests_gpu.log 2>&1
echo "gpu tests rc=$?"; tail -n 20 $OUT/h2/tests_gpu.log
fi
if [ "${PART:-}" = 2 ] || [ "${PART:-}" = 3 ] || [ -z "${PART:-}" ]; then
# 2. Qwen2.5-VL-7B shape, random bf16 weights made on the GPU (~60 s), then one process per row (~70 s each):
#    batch 2 of 512-px image + text rows, r=16 on all four groups, "unsloth" checkpointing, 8 steps, median step.
[ -d /tmp/v_qwen ] || timeout 240 python bench/bench_vision.py make --shape qwen2_5_vl_7b --out /tmp/v_qwen 2>&1 | grep -v Writing | tail -n 3
case "${PART:-}" in 2) quants=nf4 ;; 3) quants=none ;; *) quants="nf4 none" ;; esac
for quant in $quants; do
  for stack in velotune velotune-hf unsloth; do
    timeout 150 python bench/bench_vision.py run --model /tmp/v_qwen --stack $stack --quant $quant --batch 2 --image 512 --steps 8 > $OUT/h2/qwen25vl7b_${stack}_${quant}.log 2>&1
    echo "$stack $quant rc=$?"; grep RESULT $OUT/h2/qwen25vl7b_${stack}_${quant}.log || tail -n 25 $OUT/h2/qwen25vl7b_${stack}_${quant}.log
  done
done
fi
