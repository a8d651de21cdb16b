# HV (issue 20 item 7): vision training speed and memory, session 11. Run from the repo root at HV's commit (or later);
# carry .peers. One GPU (nvidia-h200). Expected ~8 min: A tests ~1.5, A2 ~0.5, B models ~1 each (skipped if present),
# C four rows ~1 each. Rows to set beside session 10's (logs/w2): Qwen2.5-VL-7B QLoRA velotune 1,183 tok/s (no
# profile) vs Unsloth 1,343 at 7.76 / 7.55 GiB; Llama-3.2-11B-Vision QLoRA velotune 294 tok/s at 36.26 GiB vs
# Unsloth 357 at 9.64 GiB. What changed: Mllama's vision encoder layers are checkpointed (models/foreign_checkpoints.py)
# and Qwen-VL's vision attention runs one SDPA call per window length (models/vision_attention.py).
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/hv
git log --oneline -1 > $OUT/hv/commit.txt; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/hv/commit.txt
# A. vision GPU tests: NF4 load + LoRA step, own-decoder fast path and engine on CUDA, grouped attention on CUDA
#    (fp32 and bf16 at the 7B's head size and window), Mllama checkpointing
timeout 150 python -m pytest -q -p no:cacheprovider --durations=5 tests/vision/test_gpu.py \
  tests/vision/test_vision_own_decoder.py tests/vision/test_vision_grouped_attention.py \
  tests/vision/test_vision_checkpointing.py > $OUT/hv/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -n 15 $OUT/hv/gpu_tests.log
# A2. the fused LoRA MLP's backward now calls the activation's backward kernel directly: kernel + fused-path GPU tests
timeout 120 python -m pytest -q -p no:cacheprovider --durations=3 tests/kernels/test_glu.py tests/fast/test_gpu.py \
  > $OUT/hv/gpu_tests_fast.log 2>&1; echo "fast gpu tests rc=$?"; tail -n 8 $OUT/hv/gpu_tests_fast.log
# B. the random-weight checkpoints (as session 10's)
[ -d /tmp/v_qwen ] || timeout 120 python bench/bench_vision.py make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $OUT/hv/make_qwen.log 2>&1
[ -d /tmp/v_mllama ] || timeout 120 python bench/bench_vision.py make --shape llama32_11b_vision --out /tmp/v_mllama > $OUT/hv/make_mllama.log 2>&1
# C. QLoRA rows, batch 2 at 512 px, 8 steps, velotune then Unsloth on each (no --profile)
for m in qwen mllama; do
  for s in velotune unsloth; do
    timeout 110 python bench/bench_vision.py run --model /tmp/v_$m --stack $s --quant nf4 --batch 2 --image 512 --steps 8 \
      > $OUT/hv/${m}_${s}_nf4.log 2>&1
    echo "$m $s rc=$?"; grep RESULT $OUT/hv/${m}_${s}_nf4.log || tail -n 25 $OUT/hv/${m}_${s}_nf4.log
  done
done
# D. optional (PROFILE=1, ~1.2 min): the Qwen2.5-VL-7B velotune step's profile after the grouped attention (what is left
#    of the host-bound step: session 10's showed 2,312 SDPA calls, 235 ms host time in the vision tower's forward)
if [ "${PROFILE:-}" = 1 ]; then
  timeout 110 python bench/bench_vision.py run --model /tmp/v_qwen --stack velotune --quant nf4 --batch 2 --image 512 --steps 8 \
    --profile > $OUT/hv/qwen_velotune_nf4_profile.log 2>&1
  echo "profile rc=$?"; grep -E "RESULT|vision_tower forward|scaled_dot_product|LoraMLP|MmBackward0" $OUT/hv/qwen_velotune_nf4_profile.log | head -n 12
fi
