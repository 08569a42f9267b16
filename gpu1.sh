export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_budget.py -k "online or scale or sweep or low_memory" 2>&1 | tail -2
timeout 300 python3 scripts/lowmem_tune.py --budget 64 > $OUT/tune64.txt 2>&1
grep -v "Vb=2048\|Vb=4096 \|T=512" $OUT/tune64.txt
