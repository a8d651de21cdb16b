# Session 20: the text layers of padded vision batches as CUDA graphs (layer_graphs.StaticMasks). One nvidia-h200;
# carry .peerspack and .bench (README.md). Writes $OUT/s20_vision.tgz. ~9.5 min.
# The CUDA tests of the padded graphs (test_layer_graphs.py's bf16-padded case, the Mllama graph test), with the
# Mllama folder written beside them, then the Llama-3.2-11B-Vision QLoRA rows of both stacks (session 19: velotune
# 312.0 tokens/s at 9.87 GiB, its text layers eager; Unsloth 337.7 at 9.64).
export PYTHONPATH=$PWD/src:$PWD:$PWD/tests:$PWD/.peers HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rm -rf .peers; tar xJf .peerspack/peers.tar.xz
O=$OUT/s20_vision; mkdir -p $O
git log --oneline -1 > $O/commit.txt; git status --short >> $O/commit.txt
. bench/queue/vision_common.sh
s=$(date +%s)
timeout 400 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1 &
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/fast/test_layer_graphs.py \
  "tests/vision/test_mllama_own_decoder.py::test_layer_graphs_run_the_self_attention_layer_only" > $O/gpu_tests.log 2>&1
echo "gpu tests rc=$?"; tail -n 3 $O/gpu_tests.log
wait; echo "mllama folder $(( $(date +%s) - s ))s"
run mllama_velotune_nf4 100 $V run --model /tmp/v_mllama --stack velotune --quant nf4 $ARGS
run mllama_unsloth_nf4 200 $V run --model /tmp/v_mllama --stack unsloth --quant nf4 $ARGS
cd $OUT && tar czf s20_vision.tgz s20_vision && rm -rf s20_vision
