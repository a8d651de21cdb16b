# Issue 19's last peer row: Unsloth's DDP beside velotune's, the same 8B folder, LoRA r=32, 2K x batch 2 x accumulation 4
# per GPU, 1 and 2 GPUs. Kind nvidia-h200-x2, carry .peers and .bench; ~6 min (folder ~2 min, 4 launches ~1 min each).
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # multicast stays off (KINDS.md)
mkdir -p $OUT/ddp
[ -d /tmp/m_llama8b ] || timeout 150 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
for stack in unsloth velotune; do
  timeout 200 python bench/bench_ddp.py --stack $stack --model /tmp/m_llama8b --quant nf4 --seq 2048 --batch 2 --accum 4 \
    --nprocs 1,2 --json $OUT/ddp/$stack.json > $OUT/ddp/$stack.log 2>&1
  echo "ddp $stack rc=$?"; grep "process(es)" $OUT/ddp/$stack.log || tail -n 30 $OUT/ddp/$stack.log
done
# the DDP GPU tests (fixed after the last run: the one-process reference sees one GPU), ~1.5 min
timeout 200 python -m pytest -q -p no:cacheprovider tests/distributed/test_gpu.py > $OUT/ddp/gpu_tests.log 2>&1; echo "ddp gpu tests rc=$?"; tail -n 5 $OUT/ddp/gpu_tests.log
