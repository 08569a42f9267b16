# Final: the kernel with the launcher's choices, the step before and after, and the GPU tests.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
for s in .before/src src; do PYTHONPATH=$PWD/$s python3 experiments/stats-lanes/ce_kernel.py $s defaults; done 2>&1 | grep -v Warn | tee $OUT/ce_kernel_defaults.csv
PYTHONPATH=$PWD/.before/src:/tmp/site python3 scripts/log_probs_bench.py --out $OUT/before.csv > $OUT/before.log 2>&1
PYTHONPATH=$PWD/src:/tmp/site python3 scripts/log_probs_bench.py --out $OUT/log_probs_bench.csv > $OUT/log_probs_bench.log 2>&1
tail -15 $OUT/before.log; tail -15 $OUT/log_probs_bench.log
PYTHONPATH=$PWD/src:/tmp/site timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py tests/test_log_probs.py tests/test_compile.py tests/test_functional.py -k "stats or class_weight or log_probs or temperature or kernel or helper or compile or gpu" 2>&1 | tail -3 | tee $OUT/tests.txt
