# unsloth's FastLanguageModel with its own fused loss and with fused_cel (scripts/unsloth_bench.py), on the GPU
# machine; .whl-uns holds the wheels it needs beyond the image and bnb/ a bitsandbytes wheel unpacked with only
# its CUDA 13 library (README.md here).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-uns/*.whl >/dev/null 2>&1 || exit 9
export PYTHONPATH=$PWD/src:/tmp/site:$PWD/.whl-uns/bnb PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-docs/benchmarks/h200-unsloth}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for spec in "tiny 2048 6 lora float32" "tiny 2048 6 full float32" "llama3.2-1b 8192 8 lora bfloat16"; do
  set -- $spec
  echo "=== $spec"
  timeout 300 python3 scripts/unsloth_bench.py --size $1 --seq $2 --steps $3 --mode $4 --dtype $5 \
    --out $OUT/$1-$4-$5.csv > $OUT/$1-$4-$5.log 2>&1
  rc=$?; grep -A30 "^versions:\|Error\|error" $OUT/$1-$4-$5.log | tail -c 2500; [ $rc = 0 ] || break
done
