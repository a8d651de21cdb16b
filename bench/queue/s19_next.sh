# Session 19's changes on the GPU. One nvidia-h200; carry .peerspack and .bench (README.md). Writes $OUT/s19.tgz.
# The GPU tests of the input embedding in host memory (tests/fast/test_host_embedding.py) and of the Mllama
# cross-attention's reshape (test_mllama_own_decoder.py), then the FP8 8B rows on the default plan, now graphed
# (plan.MAX_GRAPHED_ELEMENTS_FP8; session 19's lease, graphed by a flag: 8.05 and 11.16 GiB with the graphs' pool;
# expected ~0.98 GiB less each with the embedding in host memory, against targets 7.71 and 10.41 GiB). ~3.5 min.
# PART=2 (~9 min): the Llama-3.2-11B-Vision QLoRA row beside Unsloth (session 19: 9.87 vs 9.64 GiB; expected ~8.89).
# PART=3 (~5 min): the Qwen2.5-VL-7B QLoRA rows of both stacks (session 19: 7.60; Unsloth 7.55; expected ~6.6).
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s19; mkdir -p $O
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
. bench/queue/vision_common.sh
F="bench/bench_fp8.py speed --model /tmp/m_llama8b --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1"
if [ "${PART:-1}" = 1 ]; then
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/fast/test_host_embedding.py \
  tests/vision/test_mllama_own_decoder.py::test_module_tree_and_saves_are_transformers > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 4 $O/gpu_tests.log
[ -d /tmp/m_llama8b ] || timeout 60 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing | tail -1
run 8b_nf4-fp8_default 70 $F --mode nf4-fp8
run 8b_fp8_default 60 $F --mode fp8
fi
if [ "${PART:-}" = 2 ]; then
make_folders; wait
run mllama_velotune_nf4 100 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
fi
if [ "${PART:-}" = 3 ]; then
make_folders
run qwen_velotune_nf4 70 $V run --model /tmp/v_qwen --stack velotune --quant nf4 $ARGS
run qwen_unsloth_nf4 170 $V run --model /tmp/v_qwen --stack unsloth --quant nf4 $ARGS
fi
cd $OUT && tar czf s19_${PART:-1}.tgz s19 && rm -rf s19
