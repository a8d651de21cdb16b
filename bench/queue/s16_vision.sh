# Session 16 (issue 20): the vision rows beside Unsloth after Mllama's tower keeps only the layer outputs it reads
# (02ec71d) and its LayerNorms keep bf16 under autocast (vision/norms.py, session 14, not measured before); every row
# prints `weights_by_kind` (bench_vision.py held_by_kind: what is allocated after loading, by kind, cuBLAS workspaces
# apart) to locate Qwen2.5-VL-7B QLoRA's 35 MiB above Unsloth. One nvidia-h200; carry .peerspack.
# PART=1 (~9.5 min): GPU vision tests, Qwen QLoRA velotune / Unsloth, Mllama QLoRA velotune (+ a profiled run); both
#   folders written first (Mllama's in the background).
# PART=2 (~9 min, send within 30 s): Mllama QLoRA Unsloth (its compile: up to 280 s), Mllama bf16 velotune / Unsloth.
# PART=3 (~7 min): Qwen bf16 both stacks, Qwen QLoRA velotune again (after a fix of what PART=1 locates).
# After Mllama's vision attention runs without its mask (mllama_vision_attention.py; PART=1's profile: the masked
# cuDNN attention was half the step's GPU time): PART=4 (~8.5 min) the GPU tests, Qwen bf16 both stacks and QLoRA velotune, Mllama
# QLoRA and bf16 velotune (+ profile); PART=5 (~4.5 min, within 30 s) Mllama QLoRA and bf16 Unsloth.
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s16; mkdir -p $O /tmp/snap
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv >> $O/commit.txt
. bench/queue/vision_common.sh
if [ "${PART:-1}" = 1 ]; then
make_folders
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/vision/test_gpu.py tests/vision/test_vision_norms.py \
  tests/vision/test_mllama_own_decoder.py tests/vision/test_vision_checkpointing.py > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
run qwen_velotune_nf4 80 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/qwen_velotune_nf4.pickle
run qwen_unsloth_nf4 150 $V run --model /tmp/v_qwen --stack unsloth --quant nf4 $ARGS
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/mllama_velotune_nf4.pickle
run mllama_velotune_nf4_profile 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 4 --profile
fi
if [ "${PART:-}" = 2 ]; then
make_folders; wait
run mllama_unsloth_nf4 280 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS --snapshot /tmp/snap/mllama_unsloth_nf4.pickle
run mllama_velotune_bf16 70 $V run --model /tmp/v_mllama --stack velotune --quant none $ARGS
run mllama_unsloth_bf16 150 $V run --model /tmp/v_mllama --stack unsloth --quant none $ARGS
fi
if [ "${PART:-}" = 3 ]; then
make_folders
run qwen_velotune_nf4 80 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS
run qwen_velotune_bf16 80 $V run --model /tmp/v_qwen --stack velotune --quant none $ARGS
run qwen_unsloth_bf16 120 $V run --model /tmp/v_qwen --stack unsloth --quant none $ARGS
wait
fi
if [ "${PART:-}" = 4 ]; then
make_folders
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/vision/test_gpu.py tests/vision/test_mllama_own_decoder.py \
  tests/vision/test_vision_checkpointing.py > $O/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
run qwen_velotune_bf16 80 $V run --model /tmp/v_qwen --stack velotune --quant none $ARGS
run qwen_unsloth_bf16 130 $V run --model /tmp/v_qwen --stack unsloth --quant none $ARGS
run qwen_velotune_nf4 60 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/mllama_velotune_nf4.pickle
run mllama_velotune_bf16 60 $V run --model /tmp/v_mllama --stack velotune --quant none $ARGS
run mllama_velotune_nf4_profile 70 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 4 --profile
fi
if [ "${PART:-}" = 5 ]; then
make_folders; wait
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
run mllama_unsloth_bf16 150 $V run --model /tmp/v_mllama --stack unsloth --quant none $ARGS
fi
if [ "${PART:-}" = 6 ]; then
make_folders
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vision/test_gpu.py tests/vision/test_mllama_own_decoder.py \
  tests/vision/test_vision_own_decoder.py tests/vision/test_vision_checkpointing.py > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
run qwen_velotune_nf4 70 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS --snapshot-load /tmp/snap/qwen_load.pickle
export TORCH_CUBLASLT_UNIFIED_WORKSPACE=1; run qwen_velotune_nf4_unified 60 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS; unset TORCH_CUBLASLT_UNIFIED_WORKSPACE
run qwen_unsloth_nf4 150 $V run --model /tmp/v_qwen --stack unsloth --quant nf4 $ARGS
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/mllama_velotune_nf4.pickle
fi
if [ "${PART:-}" = 7 ]; then
make_folders; wait
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
run mllama_velotune_bf16 60 $V run --model /tmp/v_mllama --stack velotune --quant none $ARGS
run qwen_velotune_bf16 60 $V run --model /tmp/v_qwen --stack velotune --quant none $ARGS
run qwen_unsloth_bf16 130 $V run --model /tmp/v_qwen --stack unsloth --quant none $ARGS
fi
for f in /tmp/snap/*.pickle; do [ -f "$f" ] && python3 bench/snapshot_peak.py "$f" > "${f%.pickle}.peak.txt" 2>&1 && mv "${f%.pickle}.peak.txt" $O/; done
rm -f /tmp/snap/*.pickle
cd $OUT && tar czf s16_$PART.tgz s16 && rm -rf s16
