# H2 (issue 19 item 2 + 5: FSDP2 through the trainer; 8B full fine-tuning rows). Needs the 2-GPU kind (nvidia-h200-x2).
# Run from the repo root at H2's last commit (or later), carrying .peers (TRL, datasets). Two parts:
# PART=1: the 2-GPU FSDP2 tests (4 launches of a tiny Llama: LoRA + full FT, resume, consolidate, bf16, host-loaded
#         model sharded onto the GPUs; ~4 min)
# PART=2: 8B-shape full fine-tuning, velotune FSDP2 vs transformers.Trainer+FSDP2 (pure bf16 and accelerate's
#         fp32-master mixed precision), 1 and 2 GPUs (6 torchrun launches, ~6-8 min). Unset PART runs both (~12 min; all timeouts hit: 27 min).
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # multicast stays off (KINDS.md)
mkdir -p $OUT/h2
git log --oneline -1 > $OUT/h2/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h2/commit.txt
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.device_count())" >> $OUT/h2/commit.txt 2>&1
if [ "${PART:-1}" = 1 ] || [ -z "${PART:-}" ]; then
timeout 600 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_fsdp2_gpu.py > $OUT/h2/fsdp2_gpu_test.log 2>&1
echo "fsdp2 gpu test rc=$?"; tail -n 30 $OUT/h2/fsdp2_gpu_test.log
fi
if [ "${PART:-2}" = 2 ] || [ -z "${PART:-}" ]; then
# Llama-3.1-8B shape, random bf16 weights, every weight trained, AdamW, 2048 tokens x batch 1 x accumulation 4 per GPU,
# activation checkpointing per layer; nproc 1 = unsharded (does it fit on one H200?), nproc 2 = FSDP2.
for engine in velotune peer peer-amp; do
  timeout 420 python3 bench/bench_fsdp.py --shape llama8b --seq 2048 --batch 1 --accum 4 --steps 3 --warmup 1 \
    --nprocs 1,2 --engines $engine --json $OUT/h2/fsdp_8b_$engine.json > $OUT/h2/fsdp_8b_$engine.log 2>&1
  echo "bench_fsdp $engine rc=$?"; grep -E "process\(es\)|Error|error" $OUT/h2/fsdp_8b_$engine.log | tail -n 8
done
fi
