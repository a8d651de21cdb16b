# Session 12 (issue 18 follow-up + the checkpoint modes): run from the repo root on one nvidia-h200, carrying .peers
# (or .peerspack/peers.tar.xz, extracted first) and .bench (for PART=2). PART=1 (~6 min): the GPU tests of the
# checkpoint functions (offloaded and kept, graphed and eager) and the 1B rows of every checkpoint mode after
# use_gradient_checkpointing=True moved onto velotune's function (BENCHMARKS.md session 12 has the rows before).
# PART=2 (~8 min): the same at the 8B shape (NF4, True vs "unsloth" vs Unsloth's QLoRA in the same call) and the FP8
# 8B rows again beside Unsloth (session 11 lease 3 measured them 22-31% below lease 1, unexplained).
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s12; mkdir -p $O
git log --oneline -1 > $O/commit.txt 2>/dev/null; python3 bench/host_probe.py >> $O/commit.txt 2>&1
run() { name=$1; t=$2; shift 2; timeout $t python3 "$@" > $O/$name.log 2>&1; echo "$name rc=$?"; grep RESULT $O/$name.log || tail -n 8 $O/$name.log; }
if [ "${PART:-1}" = 1 ]; then
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/fast/test_layer_graphs.py tests/fast/test_checkpointing.py tests/fast/test_gpu.py > $O/tests_gpu.log 2>&1; echo "gpu tests rc=$?"; tail -n 5 $O/tests_gpu.log
# torch = True as before session 12 (torch's checkpoint), true = kept inputs (graphed here: fixed-shape batches)
for mode in nf4 nf4-fp8; do for ck in torch true unsloth false; do
  run 1b_${mode}_${ck} 60 bench/bench_fp8.py speed --model llama1b --mode $mode --steps 3 --warmup 1 --checkpointing $ck
done; done
# kept inputs without graphs: what a padded or packed batch gets (its masks are tensors: layers run eagerly)
VELOTUNE_CUDA_GRAPHS=0 run 1b_nf4_true_eager 60 bench/bench_fp8.py speed --model llama1b --mode nf4 --steps 3 --warmup 1 --checkpointing true
fi
if [ "${PART:-}" = 2 ]; then
[ -d /tmp/m_llama8b ] || timeout 120 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
for ck in torch true unsloth; do run 8b_nf4_$ck 110 bench/bench_fp8.py speed --model /tmp/m_llama8b --mode nf4 --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 --checkpointing $ck; done
for mode in nf4-fp8 fp8; do run 8b_$mode 110 bench/bench_fp8.py speed --model /tmp/m_llama8b --mode $mode --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1; done
OUT=$O PER_RUN_S=110 timeout 260 bash .bench/run_peers.sh llama8b 2048 unsloth/nf4 unsloth/none > $O/peers_8b.log 2>&1; echo "peers rc=$?"; grep -h RESULT $O/peers_8b.log
fi
