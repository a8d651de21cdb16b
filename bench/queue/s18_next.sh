# Session 18's changes on the GPU. One nvidia-h200; carry .peerspack and .bench (README.md). Each PART writes
# $OUT/s18_PART.tgz; send the next PART within 30 s of the last (the machine stays warm that long).
# PART=1 (~9 min): Mllama after session 18: the tiles no text token attends to leave before the projector and the
#   cross-attention layers (models/mllama_tiles.py; at 512 px 3 of each image's 4 tiles), our tower forward (no
#   (B, 1, L, L) mask, the used tiles stacked only: mllama_tower.py), the cross-attention without repeat_kv, the
#   towers' plain MLP in 4,096-row chunks with its adapters stacked once a call and no forward in the recomputation
#   (session 18's lease: 7 chunks made the step host-bound, 203 vs Unsloth's 300.1 tokens/s). QLoRA velotune
#   (snapshot) and Unsloth, bf16 velotune, the QLoRA profile. Compare `peak_with_graphs_gib` with Unsloth's peak.
# PART=2 (~8 min): FP8 at 8B with the layers CUDA-graphed, the graphs' pool now counted (`graph_pool_gib`,
#   `peak_with_graphs_gib`): session 18 measured 13,822 tokens/s graphed vs Unsloth's QLoRA 10,123 (1.37x), the
#   memory with the pool unknown. Unsloth's QLoRA beside.
# PART=3 (~7 min): Unsloth's bf16 LoRA at 8B (the FP8-storage target), Qwen2.5-VL-7B rows both stacks.
# PART=4 (~4 min): the vision QLoRA rows without CUDA graphs (VELOTUNE_CUDA_GRAPHS=0): what the graphs' pool costs.
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s18; mkdir -p $O /tmp/snap
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv >> $O/commit.txt
. bench/queue/vision_common.sh
F="bench/bench_fp8.py speed --model /tmp/m_llama8b --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1"
G="--max-graphed-elements 20000000"
make_8b() { [ -d /tmp/m_llama8b ] || timeout 120 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing; }
peer8b() { OUT=$O PER_RUN_S=100 timeout 130 bash .bench/run_peers.sh llama8b 2048 unsloth/$1 > $O/8b_unsloth_$1.log 2>&1
  echo "unsloth $1 rc=$?"; grep RESULT $O/8b_unsloth_$1.log || tail -n 5 $O/8b_unsloth_$1.log; }
if [ "${PART:-1}" = 1 ]; then
make_folders; wait
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vision/test_gpu.py tests/fast/test_fused_lora.py \
  tests/vision/test_mllama_own_decoder.py > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
run mllama_velotune_nf4 100 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/mllama_velotune_nf4.pickle
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
run mllama_velotune_bf16 60 $V run --model /tmp/v_mllama --stack velotune --quant none $ARGS
run mllama_velotune_nf4_profile 90 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 4 --profile
fi
if [ "${PART:-}" = 2 ]; then
make_8b
run 8b_nf4-fp8_graphs 110 $F --mode nf4-fp8 $G
run 8b_fp8_graphs 100 $F --mode fp8 $G
run 8b_nf4 100 $F --mode nf4
peer8b nf4
fi
if [ "${PART:-}" = 3 ]; then
make_8b; make_folders
peer8b bf16
run qwen_velotune_nf4 70 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS
run qwen_velotune_bf16 50 $V run --model /tmp/v_qwen --stack velotune --quant none $ARGS
run qwen_unsloth_bf16 170 $V run --model /tmp/v_qwen --stack unsloth --quant none $ARGS
fi
if [ "${PART:-}" = 4 ]; then
make_folders; wait
VELOTUNE_CUDA_GRAPHS=0 run qwen_velotune_nf4_nographs 70 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS
VELOTUNE_CUDA_GRAPHS=0 run mllama_velotune_nf4_nographs 100 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS
fi
for f in /tmp/snap/*.pickle; do [ -f "$f" ] && python3 bench/snapshot_peak.py "$f" > "${f%.pickle}.peak.txt" 2>&1 && mv "${f%.pickle}.peak.txt" $O/; done
rm -f /tmp/snap/*.pickle
cd $OUT && tar czf s18_$PART.tgz s18 && rm -rf s18
