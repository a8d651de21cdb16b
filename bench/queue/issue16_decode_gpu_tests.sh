# H1 (issue 16 decode kernels): the GPU tests no device call of session 8 let finish. Run from the repo root with
# export PYTHONPATH=$PWD/src:$PWD/.peers and carry [".peers", ".bench"]. Expected: about 3-4 minutes (every
# parametrisation compiles its Triton kernels once).
timeout 200 python3 -m pytest -q tests/inference/test_gpu.py tests/kernels/test_decode_attention.py -p no:cacheprovider > $OUT/h1_gpu_tests.txt 2>&1; echo "rc=$?" >> $OUT/h1_gpu_tests.txt
timeout 120 python3 -m pytest -q tests/kernels/test_gemv.py -p no:cacheprovider > $OUT/h1_gemv_tests.txt 2>&1; echo "rc=$?" >> $OUT/h1_gemv_tests.txt
