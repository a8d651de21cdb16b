# Sourced by the vision queue scripts (s16_vision.sh, s17_next.sh) after they set O (their output folder):
# `run NAME TIMEOUT ARGS...` runs one python row under a timeout with its log in $O, `make_folders` writes the two
# random-weight model folders once per machine (Mllama's in the background: `wait` before its rows).
run() { name=$1; t=$2; shift 2; s=$(date +%s); timeout $t python3 "$@" > $O/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s"; grep RESULT $O/$name.log || tail -n 8 $O/$name.log; }
V=bench/bench_vision.py
ARGS="--batch 2 --image 512 --steps 8"
make_folders() {
  [ -f /tmp/v_mllama/processor_config.json ] || [ -f /tmp/v_mllama/preprocessor_config.json ] || \
    timeout 400 python3 $V make --shape llama32_11b_vision --out /tmp/v_mllama > $O/make_mllama.log 2>&1 &
  [ -d /tmp/v_qwen ] || timeout 100 python3 $V make --shape qwen2_5_vl_7b --out /tmp/v_qwen > $O/make_qwen.log 2>&1
}
