# Session 14 (issue 20): where the vision rows' memory goes, beside Unsloth. Run from the repo root on one nvidia-h200;
# carry .peerspack (or .peers). Every row prints `phases_gib` (bench_vision.py: the weights, then forward and backward
# of step 2: allocated before, own peak, left after) and writes a torch.cuda.memory snapshot of step 2 (xz'd in $OUT)
# for the allocations alive at the peak.
# PART=A (~9.5 min): Qwen2.5-VL-7B QLoRA velotune / Unsloth, velotune with every layer input offloaded
#   (--offload-min-tokens 0; default 1024 tokens a micro-batch: this batch has ~850), bf16 velotune / Unsloth; Mllama's
#   folder is written in the background for PART=B (send it within 30 s).
# PART=B (~8 min): Llama-3.2-11B-Vision QLoRA velotune, velotune-hf (transformers' text classes), Unsloth (280 s: its
#   compile).
# After the fixes (towers' layer inputs offloaded under "unsloth", the recomputing MLP backward's gradients written over
# its gate/up outputs): PART=C (~8 min) the GPU tests of both, then Qwen2.5-VL-7B QLoRA and bf16 both stacks and Mllama
# QLoRA velotune (its folder written in the background); PART=D (~6 min, within 30 s) Mllama QLoRA Unsloth, bf16
# both stacks.
# PART=E (~8 min, what session 14 ran last): after Mllama's keyword hidden states reach the offloading checkpoint and
# OFFLOAD_MIN_TOKENS fell to 512 (at dc43f6d; back to 1024 after this call, so the default rows now keep Qwen's text
# inputs, as the keep1024 row did): the checkpointing tests, Qwen2.5-VL-7B QLoRA and bf16 both stacks (Unsloth's QLoRA
# row timed out at 140 s: Mllama's folder was being written beside it), Mllama QLoRA velotune, Qwen QLoRA velotune with
# --offload-min-tokens 1024.
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d .peers ] || tar xJf .peerspack/peers.tar.xz
O=$OUT/s14; mkdir -p $O /tmp/snap
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
run() { name=$1; t=$2; shift 2; s=$(date +%s); timeout $t python3 "$@" --snapshot /tmp/snap/$name.pickle > $O/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s"; grep RESULT $O/$name.log || tail -n 8 $O/$name.log; }
V=bench/bench_vision.py
qwen_rows() {  # Qwen2.5-VL-7B QLoRA and bf16 LoRA, velotune then Unsloth (its compile: up to 130 s)
  for q in nf4 none; do
    run qwen_velotune_${q/none/bf16} 80 $V run --model /tmp/v_qwen --stack velotune --quant $q --batch 2 --image 512 --steps 8
    run qwen_unsloth_${q/none/bf16} 150 $V run --model /tmp/v_qwen --stack unsloth --quant $q --batch 2 --image 512 --steps 8
  done
}
if [ "${PART:-A}" = A ]; then
[ -d /tmp/v_qwen ] || timeout 100 python3 $V make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $O/make_qwen.log 2>&1
[ -d /tmp/v_mllama ] || timeout 400 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1 &
run qwen_velotune_nf4 80 $V run --model /tmp/v_qwen --stack velotune --quant nf4 --batch 2 --image 512 --steps 8
run qwen_unsloth_nf4 150 $V run --model /tmp/v_qwen --stack unsloth --quant nf4 --batch 2 --image 512 --steps 8
run qwen_velotune_nf4_offload0 80 $V run --model /tmp/v_qwen --stack velotune --quant nf4 --batch 2 --image 512 --steps 8 --offload-min-tokens 0
run qwen_velotune_bf16 80 $V run --model /tmp/v_qwen --stack velotune --quant none --batch 2 --image 512 --steps 8
run qwen_unsloth_bf16 100 $V run --model /tmp/v_qwen --stack unsloth --quant none --batch 2 --image 512 --steps 8
wait; ls /tmp/v_mllama >> $O/make_mllama.log
fi
if [ "${PART:-}" = B ]; then
[ -f /tmp/v_mllama/preprocessor_config.json ] || [ -f /tmp/v_mllama/processor_config.json ] || timeout 200 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1
run mllama_velotune_nf4 100 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 8
run mllama_unsloth_nf4 280 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 --batch 2 --image 512 --steps 8
run mllama_velotune-hf_nf4 90 $V run --model /tmp/v_mllama --stack velotune-hf --quant nf4 --batch 2 --image 512 --steps 8
fi
if [ "${PART:-}" = C ]; then
[ -d /tmp/v_qwen ] || timeout 100 python3 $V make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $O/make_qwen.log 2>&1
[ -d /tmp/v_mllama ] || timeout 400 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1 &
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/vision/test_vision_checkpointing.py tests/vision/test_vision_norms.py tests/kernels/test_glu.py \
  tests/vision/test_vision_own_decoder.py -k "cuda or checkpoint or direct" > $O/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
qwen_rows
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 80 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 8
fi
if [ "${PART:-}" = D ]; then
[ -f /tmp/v_mllama/preprocessor_config.json ] || [ -f /tmp/v_mllama/processor_config.json ] || timeout 200 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 --batch 2 --image 512 --steps 8
run mllama_velotune_bf16 70 $V run --model /tmp/v_mllama --stack velotune --quant none --batch 2 --image 512 --steps 8
run mllama_unsloth_bf16 150 $V run --model /tmp/v_mllama --stack unsloth --quant none --batch 2 --image 512 --steps 8
fi
if [ "${PART:-}" = E ]; then
[ -d /tmp/v_mllama ] || timeout 400 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1 &
[ -d /tmp/v_qwen ] || timeout 100 python3 $V make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $O/make_qwen.log 2>&1
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/vision/test_vision_checkpointing.py > $O/gpu_tests.log 2>&1; echo "tests rc=$?"; tail -n 2 $O/gpu_tests.log
qwen_rows  # (session 14 ran these with 70/140/50/100 s limits)
wait; ls /tmp/v_mllama >> $O/make_mllama.log
run mllama_velotune_nf4 70 $V run --model /tmp/v_mllama --stack velotune --quant nf4 --batch 2 --image 512 --steps 8
run qwen_velotune_nf4_keep1024 60 $V run --model /tmp/v_qwen --stack velotune --quant nf4 --batch 2 --image 512 --steps 8 --offload-min-tokens 1024
fi
cd /tmp/snap && for f in *.pickle; do [ -f "$f" ] && xz -T8 -3 "$f"; done; tar cf $O/snaps.tar *.xz 2>/dev/null; rm -f /tmp/snap/*.xz
cd $OUT && tar czf s14_$PART.tgz s14 && rm -rf s14
