# HG (issue 17 item 7): generation's persistent stacked LoRA buffers (fast/stacked_adapters.py).
# Run from the repo root at HG's commit; carry .peers and .bench. Expected ~5.5 min (7 at worst) on nvidia-h200 (one GPU).
# Pieces in priority order, each under its own timeout: A GPU tests ~1.5 min (3 at worst: kernel compiles), models ~0.8, B/C 8B rows with and
# without the buffers (same run: the before/after pair) ~1.3 each, D/E the same for 1B ~0.6 each.
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/hg
git log --oneline -1 > $OUT/hg/commit.txt; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/hg/commit.txt
# A. the engine's GPU tests (CUDA graphs bit for bit, NF4/GEMV decode), the refreshed-buffers-through-graphs test, fused LoRA on GPU
timeout 180 python -m pytest -q -p no:cacheprovider --durations=5 \
  "tests/inference/test_stacked_adapters.py::test_captured_graphs_read_refreshed_buffers_on_cuda" \
  tests/inference/test_gpu.py tests/fast/test_gpu.py > $OUT/hg/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -n 15 $OUT/hg/gpu_tests.log
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
[ -d /tmp/m_llama1b ] || timeout 60 python .bench/peer_bench.py make --out /tmp/m_llama1b --preset llama1b 2>&1 | grep -v Writing
g() {  # g NAME TIMEOUT ARGS...: one velotune row (bench/bench_grpo.py), its log under $OUT/hg
  name=$1; t=$2; shift 2
  timeout $t python bench/bench_grpo.py "$@" > $OUT/hg/$name.log 2>&1; echo "$name rc=$?"
  grep RESULT $OUT/hg/$name.log || tail -n 25 $OUT/hg/$name.log
}
# B/C. 8B, 8 generations x 512 (session 10: 4.47 s/step, generate 4.04; Unsloth 6.63): with the buffers, then without
g v_8b_512 150 --model /tmp/m_llama8b --gens 8 --completion 512
g v_8b_512_before 150 --model /tmp/m_llama8b --gens 8 --completion 512 --no-stacked-adapters
# D/E. 1B, the same
g v_1b_512 80 --model /tmp/m_llama1b --gens 8 --completion 512
g v_1b_512_before 80 --model /tmp/m_llama1b --gens 8 --completion 512 --no-stacked-adapters
# F. where the 8B step goes now (step 2 profiled: the decode graph's kernels; compare session 10's v_8b_512_profile)
g v_8b_512_profile 150 --model /tmp/m_llama8b --gens 8 --completion 512 --profile
