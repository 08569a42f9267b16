# Issue 16 on one H200: SFTTrainer with TRL's kernel and with fused_cel installed (Llama 3.2 1B shape),
# the heads side by side (all labels counted, half ignored) with errors against float64, and the GPU tests.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD/src:/tmp/site
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
python3 scripts/sft_bench.py --size llama3.2-1b --seq 8192 --steps 8 --out $OUT/sft_bench.csv 2>&1 | grep -v -i warn | tail -8 | tee $OUT/sft_bench.txt
python3 scripts/log_probs_bench.py --errors --out $OUT/heads_full.csv > $OUT/heads_full.txt 2>&1; tail -28 $OUT/heads_full.txt
python3 scripts/log_probs_bench.py --ignored 0.5 --errors --out $OUT/heads_half.csv > $OUT/heads_half.txt 2>&1; tail -28 $OUT/heads_half.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_log_probs.py -k "uniform or log_probs_and" tests/test_gpu.py 2>&1 | tail -2 | tee $OUT/tests.txt
