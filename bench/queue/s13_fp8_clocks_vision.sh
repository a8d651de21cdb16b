# Session 13 (issues 18 and 20): run from the repo root on one nvidia-h200 (or one GPU of nvidia-h200-x2: then run
# PART=1 on both kinds if both are lent, it is the comparison that matters). Carry .peerspack (or .peers) and .bench.
# PART=1 (~6 min): why FP8 GEMMs make the 8B step slower on the single-GPU machine (session 13: NF4+FP8 9,649 vs NF4
#   10,639 tokens/s) while the x2 machine ran them 1.29x Unsloth (session 11 lease 1): GPU clocks, power and throttle
#   reasons sampled every 200 ms beside the bf16 and FP8 GEMM timings (`bench_fp8.py kernels`) and the 8B NF4 vs
#   NF4+FP8 step rows, then the NF4+FP8 step profiled (the FP8 pieces summed: compare session 11's lease 1 numbers).
# PART=2 (~8 min): vision rows beside Unsloth (Unsloth's Mllama compile needs more than 150 s: 280 s here):
#   Qwen2.5-VL-7B bf16 LoRA both stacks, Llama-3.2-11B-Vision QLoRA both stacks (and velotune-hf, the language model
#   on transformers' classes, the row before Mllama's own decoder (session 13): compare).
# PART=3 (~6 min): issue 17's memory target (no more than Unsloth's GRPO peak): the 8B GRPO step with the engine's
#   KV cache kept between steps (the default below 1/8 of the weight bytes) and given back every step
#   (--keep-cache-fraction 0: re-captures the decode graphs), beside Unsloth's GRPO in the same call (session 10 on
#   x2: velotune 18.04 GiB, Unsloth 17.26).
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s13; mkdir -p $O
git log --oneline -1 > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit,power.max_limit --format=csv >> $O/commit.txt
run() { name=$1; t=$2; shift 2; timeout $t python3 "$@" > $O/$name.log 2>&1; echo "$name rc=$?"; grep RESULT $O/$name.log || tail -n 8 $O/$name.log; }
if [ "${PART:-1}" = 1 ]; then
nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $O/smi_idle.txt 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv -lms 200 > $O/smi_trace.csv 2>&1 &
SMI=$!
[ -n "${SKIP_KERNELS:-}" ] || run kernels 120 bench/bench_fp8.py kernels
[ -d /tmp/m_llama8b ] || timeout 120 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
echo "nf4 start $(date +%s.%N)" >> $O/marks.txt
run 8b_nf4 110 bench/bench_fp8.py speed --model /tmp/m_llama8b --mode nf4 --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1
echo "nf4-fp8 start $(date +%s.%N)" >> $O/marks.txt
run 8b_nf4-fp8 110 bench/bench_fp8.py speed --model /tmp/m_llama8b --mode nf4-fp8 --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1
echo "profile start $(date +%s.%N)" >> $O/marks.txt
run 8b_nf4-fp8_profile 110 bench/bench_fp8.py speed --model /tmp/m_llama8b --mode nf4-fp8 --seq 2048 --bs 2 --ga 4 --steps 3 --warmup 1 --profile
kill $SMI; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $O/smi_after.txt 2>&1
# the sampled SM clock and power while each row ran (the reasons column names power or thermal capping)
python3 - "$O" <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(f"{sys.argv[1]}/smi_trace.csv")))[1:]
reasons = collections.Counter(r[-1].strip() for r in rows if len(r) > 5)
clocks = [float(r[1].split()[0]) for r in rows if len(r) > 5 and r[1].strip().split()[0].replace('.', '').isdigit()]
power = [float(r[3].split()[0]) for r in rows if len(r) > 5 and r[3].strip().split()[0].replace('.', '').isdigit()]
print("SMI samples", len(rows), "sm MHz min/median/max", min(clocks, default=0), sorted(clocks)[len(clocks)//2] if clocks else 0,
      max(clocks, default=0), "power W max", max(power, default=0), "reasons", reasons.most_common(4))
PY
fi
if [ "${PART:-}" = 2 ]; then
for m in qwen mllama; do
  sh=qwen2_5_vl_7b; [ $m = mllama ] && sh=llama32_11b_vision
  [ -d /tmp/v_$m ] || timeout 100 python3 bench/bench_vision.py make --shape $sh --out /tmp/v_$m > $O/make_$m.log 2>&1
done
run qwen_velotune_bf16 90 bench/bench_vision.py run --model /tmp/v_qwen --stack velotune --quant none --batch 2 --image 512 --steps 8
run qwen_unsloth_bf16 200 bench/bench_vision.py run --model /tmp/v_qwen --stack unsloth --quant none --batch 2 --image 512 --steps 8
run mllama_velotune_nf4 90 bench/bench_vision.py run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 8
run mllama_velotune-hf_nf4 90 bench/bench_vision.py run --model /tmp/v_mllama --stack velotune-hf --quant nf4 --batch 2 --image 512 --steps 8
run mllama_unsloth_nf4 280 bench/bench_vision.py run --model /tmp/v_mllama --stack unsloth --quant nf4 --batch 2 --image 512 --steps 8
fi
if [ "${PART:-}" = 3 ]; then
[ -d /tmp/m_llama8b ] || timeout 120 python3 .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
run grpo_8b_512 150 bench/bench_grpo.py --model /tmp/m_llama8b --gens 8 --completion 512
run grpo_8b_512_release 150 bench/bench_grpo.py --model /tmp/m_llama8b --gens 8 --completion 512 --keep-cache-fraction 0
run grpo_8b_512_unsloth 200 .bench/grpo_bench.py --model /tmp/m_llama8b --stack unsloth --gens 8 --completion 512
fi
cd $OUT && tar czf s13_$PART.tgz s13 && rm -rf s13
