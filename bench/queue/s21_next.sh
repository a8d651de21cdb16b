# Issue 20 (all four vision rows beside Unsloth in one lease, after session 20's graphs of padded batches) and issue
# 18 (the FP8 8B rows again). One nvidia-h200; carry .peerspack and .bench (README.md). Each PART writes
# $OUT/s21_PART.tgz; send the next PART within 30 s of the last. Every row logs to its own file inside the tarball.
# PART=1 (~9.5 min): the Mllama folder starts writing in a process of its own (setsid: it outlives the call), the
#   Qwen2.5-VL-7B rows of both stacks, QLoRA and bf16 LoRA (session 19: velotune QLoRA 1,136.0 at 7.60 GiB, text
#   layers eager, embedding on the GPU; Unsloth 7.55 in session 18; bf16 1,517.9 at 16.52 vs 1,431.0 at 16.51).
# PART=2 (~9 min): the Llama-3.2-11B-Vision rows of both stacks, QLoRA and bf16 LoRA (session 20: QLoRA 659.7 at 9.25
#   GiB vs Unsloth 379.9 at 9.64; bf16 session 19 329.1 at 21.93, Unsloth 325.6 at 22.61 in session 18).
# PART=3 (~5 min): the FP8 8B rows beside Unsloth's (s20_fp8.sh PART=1; session 20: FP8 storage 1.34x, target 1.4x).
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf .peers; tar xJf .peerspack/peers.tar.xz  # afresh: a half-extracted copy kept from a broken call crashes imports
O=$OUT/s21; mkdir -p $O
{ git log --oneline -1; git status --short; } > $O/commit.txt
. bench/queue/vision_common.sh
if [ "${PART:-1}" = 1 ]; then
[ -f /tmp/v_mllama/done ] || setsid bash -c "timeout 420 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > /tmp/make_mllama.log 2>&1; touch /tmp/v_mllama/done" < /dev/null > /dev/null 2>&1 &
[ -d /tmp/v_qwen ] || timeout 100 python3 $V make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $O/make_qwen.log 2>&1
for quant in nf4 none; do
  run qwen_velotune_$quant 80 $V run --model /tmp/v_qwen --stack velotune --quant $quant $ARGS
  run qwen_unsloth_$quant 170 $V run --model /tmp/v_qwen --stack unsloth --quant $quant $ARGS
done
fi
if [ "${PART:-}" = 2 ]; then
while [ ! -f /tmp/v_mllama/done ]; do sleep 2; done; tail -n 1 /tmp/make_mllama.log
for quant in nf4 none; do
  run mllama_velotune_$quant 100 $V run --model /tmp/v_mllama --stack velotune --quant $quant $ARGS
  run mllama_unsloth_$quant 170 $V run --model /tmp/v_mllama --stack unsloth --quant $quant $ARGS
done
fi
if [ "${PART:-}" = 3 ]; then
OUT=$O PART=1 bash bench/queue/s20_fp8.sh
fi
cd $OUT && tar czf s21_${PART:-1}.tgz s21 && rm -rf s21
