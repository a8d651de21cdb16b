# Session 19's GRPO rows (issue 17 item 7): the 1B rows left from issue17_grpo_rows.sh B and E in one run:
# velotune and TRL at 8 x 512, velotune and Unsloth at 8 x 4,096 completions. One nvidia-h200; carry .peerspack, .bench.
export PYTHONPATH=$PWD/src:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
mkdir -p $OUT/h3; git log --oneline -1 > $OUT/h3/commit.txt
[ -d /tmp/m_llama1b ] || timeout 60 python .bench/peer_bench.py make --out /tmp/m_llama1b --preset llama1b 2>&1 | grep -v Writing
g() { name=$1; t=$2; shift 2; timeout $t python bench/bench_grpo.py "$@" > $OUT/h3/$name.log 2>&1; echo "$name rc=$?"
  grep RESULT $OUT/h3/$name.log || tail -n 15 $OUT/h3/$name.log; }
p() { name=$1; t=$2; shift 2; timeout $t python .bench/grpo_bench.py "$@" > $OUT/h3/$name.log 2>&1; echo "$name rc=$?"
  grep RESULT $OUT/h3/$name.log || tail -n 15 $OUT/h3/$name.log; }
g v_1b_512 80 --model /tmp/m_llama1b --gens 8 --completion 512
p t_1b_512 130 --model /tmp/m_llama1b --stack trl --gens 8 --completion 512 --steps 2
g v_1b_4k 120 --model /tmp/m_llama1b --gens 8 --completion 4096 --steps 2
p u_1b_4k 170 --model /tmp/m_llama1b --stack unsloth --gens 8 --completion 4096 --steps 2
cd $OUT && tar czf s19_grpo.tgz h3 && rm -rf h3
