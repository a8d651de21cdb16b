# H3 (issue 17 item 7 + the docs' 20K memory claim). Run from the repo root at the commit H3 reports; carry .bench and .peers.
# Pieces in priority order, each under its own timeout; A alone answers "where does the 8B step go" (about 5 min).
# Expected: A ~5 min, B ~4 min, C ~3 min, D ~2.5 min, E ~8 min (cut E first if time is short).
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/h3
git log --oneline -1 > $OUT/h3/commit.txt; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $OUT/h3/commit.txt
[ -d /tmp/m_llama1b ] || timeout 60 python .bench/peer_bench.py make --out /tmp/m_llama1b --preset llama1b 2>&1 | grep -v Writing
[ -d /tmp/m_llama8b ] || timeout 120 python .bench/peer_bench.py make --out /tmp/m_llama8b --preset llama8b 2>&1 | grep -v Writing
g() {  # g NAME TIMEOUT ARGS...: one velotune row (bench/bench_grpo.py), its log under $OUT/h3
  name=$1; t=$2; shift 2
  timeout $t python bench/bench_grpo.py "$@" > $OUT/h3/$name.log 2>&1; echo "$name rc=$?"
  grep RESULT $OUT/h3/$name.log || tail -n 25 $OUT/h3/$name.log
}
p() {  # p NAME TIMEOUT ARGS...: one peer row (.bench/grpo_bench.py --stack trl|unsloth)
  name=$1; t=$2; shift 2
  timeout $t python .bench/grpo_bench.py "$@" > $OUT/h3/$name.log 2>&1; echo "$name rc=$?"
  grep RESULT $OUT/h3/$name.log || tail -n 25 $OUT/h3/$name.log
}
# A. where velotune's step goes (generate / log-prob passes / train), with step 2 profiled; 8 gens x 512 tokens
g v_8b_512_profile 200 --model /tmp/m_llama8b --gens 8 --completion 512 --profile
g v_1b_512_profile 120 --model /tmp/m_llama1b --gens 8 --completion 512 --profile
# the same 1B row releasing the KV cache every step: what the graph re-captures cost (vs. keeping it)
g v_1b_512_release 120 --model /tmp/m_llama1b --gens 8 --completion 512 --keep-cache-fraction 0
# B. peers at 512 in the same run (window 1: TRL 1B 14.2 s; Unsloth 1B 2.46 s, 8B 6.57 s)
p u_1b_512 150 --model /tmp/m_llama1b --stack unsloth --gens 8 --completion 512
p u_8b_512 200 --model /tmp/m_llama8b --stack unsloth --gens 8 --completion 512
p t_1b_512 150 --model /tmp/m_llama1b --stack trl --gens 8 --completion 512 --steps 2
# C. the docs' memory claim: Llama-3.1-8B, 8 generations, 20K context (docs: Unsloth 54.3 GB, standard 510.8 GB).
#    A 19,968-token prompt + 512 completion tokens = 20,480 context: the same KV cache (8 x 20K) and training pass
#    (8 x 20K tokens) as 20K completions, without 20K decode steps (which would take ~8 min a step here).
g v_8b_20k_memory 300 --model /tmp/m_llama8b --gens 8 --prompt-words 19968 --completion 512 --steps 2
# D. ORPO on the 8B shape (issue item 6: velotune's log-probs through the chunked kernel, Unsloth's and TRL's build
#    the (2 x bs, T, V) logits), bench_dpo.py defaults (prompt 512, answers 512, bs 2 x ga 4, r 32); ~2.5 min
for s in velotune unsloth; do
  timeout 150 python bench/bench_dpo.py run --model /tmp/m_llama8b --stack $s --method orpo > $OUT/h3/orpo_8b_$s.log 2>&1
  echo "orpo $s rc=$?"; grep RESULT $OUT/h3/orpo_8b_$s.log || tail -n 25 $OUT/h3/orpo_8b_$s.log
done
# E. 4K completions (issue item 7), 2 steps (the second is the figure); Unsloth beside
g v_1b_4k 200 --model /tmp/m_llama1b --gens 8 --completion 4096 --steps 2
p u_1b_4k 250 --model /tmp/m_llama1b --stack unsloth --gens 8 --completion 4096 --steps 2
g v_8b_4k 300 --model /tmp/m_llama8b --gens 8 --completion 4096 --steps 2
p u_8b_4k 300 --model /tmp/m_llama8b --stack unsloth --gens 8 --completion 4096 --steps 2
