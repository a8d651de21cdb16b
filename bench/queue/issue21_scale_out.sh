# H6 (issue 21: scale-out rows). Run from the repo root at H6's last commit (or later), carrying .peers (PEFT is the
# peer's LoRA; bitsandbytes for NF4). Uses whatever GPUs the kind has (1, 2, 4 or 8); each piece under its own timeout.
# Smallest first:
# PART=1 (1 GPU, nvidia-h200, ~4-6 min): 70B QLoRA on one GPU (random NF4 layers made one at a time), LoRA r=16, 2K x 1 x 4.
# PART=2 (any kind, >= 2 GPUs; x2 ~12 min, x8 ~35 min: split it): FSDP2 rows, 8B full + LoRA and 70B LoRA, 1..N GPUs.
# PART=3 (x8 only, ~6 min): 70B full fine-tuning on 8 GPUs.
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # multicast stays off (KINDS.md)
mkdir -p $OUT/h6
git log --oneline -1 > $OUT/h6/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h6/commit.txt
G=$(python3 -c "import torch; print(torch.cuda.device_count())")
NP=$(python3 -c "print(','.join(str(n) for n in (1, 2, 4, 8) if n <= $G))")
echo "GPUs: $G, process counts: $NP"
if [ "${PART:-1}" = 1 ] || [ -z "${PART:-}" ]; then
  timeout 540 python3 bench/bench_train.py --shape llama70b --quant nf4 --rank 16 --seq 2048 --batch 1 --accum 4 \
    --steps 3 --warmup 1 --path fast > $OUT/h6/qlora_70b_1gpu.log 2>&1
  echo "70B QLoRA rc=$?"; grep -E "^RESULT|Error" $OUT/h6/qlora_70b_1gpu.log | tail -n 3
fi
if [ "${PART:-2}" = 2 ] || [ -z "${PART:-}" ]; then
  for job in "llama8b lora velotune,peer" "llama8b full velotune,peer" "llama70b lora velotune"; do
    set -- $job
    timeout 900 python3 bench/bench_fsdp.py --shape $1 --mode $2 --nprocs $NP --engines $3 \
      --json $OUT/h6/fsdp_$1_$2.json > $OUT/h6/fsdp_$1_$2.log 2>&1
    echo "bench_fsdp $1 $2 rc=$?"; sed -n '/^| engine/,$p' $OUT/h6/fsdp_$1_$2.log; grep -E "failed|Error" $OUT/h6/fsdp_$1_$2.log | tail -n 3
  done
fi
if [ "${PART:-3}" = 3 ] && [ "$G" -ge 8 ]; then
  timeout 600 python3 bench/bench_fsdp.py --shape llama70b --mode full --nprocs 8 --batch 4 --accum 1 --engines velotune \
    --json $OUT/h6/fsdp_70b_full.json > $OUT/h6/fsdp_70b_full.log 2>&1
  echo "bench_fsdp 70B full rc=$?"; sed -n '/^| engine/,$p' $OUT/h6/fsdp_70b_full.log
fi
