# Session 17's changes on the GPU, and why FP8 slows the 8B step on the single-GPU kind. One nvidia-h200;
# carry .peerspack and .bench (see README.md). Each PART writes $OUT/s17_PART.tgz.
# PART=1 (~9.5 min): GPU vision tests (the towers' MLPs as one fused node each: fast/lora_plain_mlp.py for Mllama
#   and Qwen2-VL, the decoders' gated MLP for Qwen2.5-VL; Mllama's read states' own gradients (OwnGradient); both
#   towers' attention through the row gather/scatter functions), Qwen2.5-VL-7B QLoRA velotune (the NF4 probe now
#   gives back its 32 MiB: is "other (caches a stack keeps)" 0?) and Unsloth, Llama-3.2-11B-Vision QLoRA velotune
#   with a snapshot (session 17: 10.06 GiB vs Unsloth's 9.64; the CPU replay estimates ~9.75 after the changes).
# PART=2 (~8.5 min, send within 30 s): Mllama QLoRA Unsloth, the bf16 rows of both families and both stacks.
# PART=3 (~6 min): FP8 at 8B. Session 17's profile: an NF4+FP8 micro-batch ran 302 ms of kernels in ~450 ms of wall
#   time (bf16 GEMMs: ~385 ms, GPU-bound), and the bf16 row, not the FP8 one, was power-capped. Host-bound? Rows with
#   `gpu_wait_s` (seconds a step's host waited on the GPU: near 0 = host-bound), the same rows with the layers
#   CUDA-graphed (--max-graphed-elements; its pool's memory is the cost), `lscpu` of this machine, Unsloth's QLoRA
#   beside.
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s17; mkdir -p $O /tmp/snap
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv >> $O/commit.txt
lscpu | grep -E "Model name|^CPU\(s\)|MHz|Thread|Socket" >> $O/commit.txt
. bench/queue/vision_common.sh
if [ "${PART:-1}" = 1 ]; then
make_folders
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vision/test_gpu.py tests/vision/test_mllama_own_decoder.py \
  tests/vision/test_vision_own_decoder.py tests/vision/test_vision_checkpointing.py tests/fast/test_fused_lora.py \
  tests/vision/test_vision_grouped_attention.py \
  > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
run qwen_velotune_nf4 70 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/qwen_velotune_nf4.pickle
run qwen_unsloth_nf4 150 $V run --model /tmp/v_qwen --stack unsloth --quant nf4 $ARGS
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS --snapshot /tmp/snap/mllama_velotune_nf4.pickle
fi
if [ "${PART:-}" = 2 ]; then
make_folders; wait
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
run mllama_velotune_bf16 60 $V run --model /tmp/v_mllama --stack velotune --quant none $ARGS
run mllama_unsloth_bf16 150 $V run --model /tmp/v_mllama --stack unsloth --quant none $ARGS
run qwen_velotune_bf16 50 $V run --model /tmp/v_qwen --stack velotune --quant none $ARGS
run qwen_unsloth_bf16 110 $V run --model /tmp/v_qwen --stack unsloth --quant none $ARGS
fi
if [ "${PART:-}" = 3 ]; then
[ -d /tmp/m_llama8b ] || timeout 120 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
F="bench/bench_fp8.py speed --model /tmp/m_llama8b --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1"
run 8b_nf4 100 $F --mode nf4
run 8b_nf4-fp8 100 $F --mode nf4-fp8
run 8b_nf4-fp8_graphs 110 $F --mode nf4-fp8 --max-graphed-elements 20000000
run 8b_nf4_graphs 110 $F --mode nf4 --max-graphed-elements 20000000
OUT=$O PER_RUN_S=100 timeout 130 bash .bench/run_peers.sh llama8b 2048 unsloth/nf4 > $O/8b_unsloth_nf4.log 2>&1
echo "unsloth nf4 rc=$?"; grep RESULT $O/8b_unsloth_nf4.log || tail -n 5 $O/8b_unsloth_nf4.log
fi
for f in /tmp/snap/*.pickle; do [ -f "$f" ] && python3 bench/snapshot_peak.py "$f" > "${f%.pickle}.peak.txt" 2>&1 && mv "${f%.pickle}.peak.txt" $O/; done
rm -f /tmp/snap/*.pickle
cd $OUT && tar czf s17_$PART.tgz s17 && rm -rf s17
