# H1 (session 9): streaming load on the H200. Run from the repo root with PYTHONPATH=$PWD/src:$PWD/.peers.
# PART=1 (nvidia-h200, ~8 min): GPU tests (bytes equal whole-model quantization on CUDA; GPU peak bound),
#   then the Llama-3.1-8B shape, a 16 GB bf16 folder of ~5 GB shards: streaming vs the previous order
#   (16-bit on the GPU, then quantized), NF4; then int8 and FP8 streaming.
# PART=2 (nvidia-h200-x4 or -x8 for the 235 GiB disk and 512 GiB RAM; one GPU used, ~15 min): the
#   Llama-3.1-70B shape (141 GB bf16 folder) loaded in NF4 on one GPU: the number issue 21 needs.
set -u
mkdir -p $OUT
if [ "${PART:-1}" = 1 ]; then
  timeout 240 python -m pytest -q -s tests/loading/test_stream_load_gpu.py tests/loading/test_stream_load.py \
    -p no:cacheprovider > $OUT/tests.txt 2>&1; echo "tests rc=$?" >> $OUT/tests.txt
  timeout 420 python bench/bench_stream_load.py --shape llama8b --folder /tmp/m8b --quant nf4 \
    --paths stream,whole --json $OUT/load_8b_nf4.json > $OUT/load_8b_nf4.txt 2>&1
  timeout 200 python bench/bench_stream_load.py --shape llama8b --folder /tmp/m8b --quant int8 \
    --paths stream --json $OUT/load_8b_int8.json > $OUT/load_8b_int8.txt 2>&1
  timeout 120 python bench/bench_stream_load.py --shape llama8b --folder /tmp/m8b --quant fp8 \
    --paths stream --json $OUT/load_8b_fp8.json > $OUT/load_8b_fp8.txt 2>&1
else
  df -h /tmp > $OUT/disk.txt; free -g >> $OUT/disk.txt
  timeout 1500 python bench/bench_stream_load.py --shape llama70b --folder /tmp/m70b --quant nf4 \
    --paths stream --json $OUT/load_70b_nf4.json > $OUT/load_70b_nf4.txt 2>&1
fi
