# The token statistics from pass 2: the kernel alone over launch configurations, then the step, before and after.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
for s in .before/src src; do PYTHONPATH=$PWD/$s python3 experiments/stats-lanes/ce_kernel.py $s; done 2>&1 | grep -v Warn | tee $OUT/ce_kernel.csv
PYTHONPATH=$PWD/.before/src:/tmp/site python3 scripts/log_probs_bench.py --out $OUT/before.csv > $OUT/before.log 2>&1
PYTHONPATH=$PWD/src:/tmp/site python3 scripts/log_probs_bench.py --out $OUT/log_probs_bench.csv > $OUT/log_probs_bench.log 2>&1
tail -15 $OUT/before.log; tail -15 $OUT/log_probs_bench.log
