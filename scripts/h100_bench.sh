#!/usr/bin/env bash
# The committed H100 benchmark record (docs/benchmarks/h100-bench/): run on the GPU machine from
# the repository root, with the peers' wheels installed (liger-kernel, cut-cross-entropy).
#   bash scripts/h100_bench.sh OUTDIR
set -euo pipefail
out=${1:-bench-results}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
methods='plain,compile,liger,cce,fused_cel,fused_cel[chunk_size=8192]'
python3 -m fused_cel.bench --preset llama3-8b --preset gemma2-2b --preset mistral-7b --preset gpt2 \
    --methods "$methods" --out "$out/heads"
python3 -m fused_cel.bench --preset qwen2.5-7b --tokens 16384 --methods "$methods" --out "$out/qwen16k"
python3 -m fused_cel.bench --preset llama3-8b --tokens 1024 --tokens 4096 --tokens 16384 --tokens 65536 \
    --tokens 131072 --methods fused_cel,liger --out "$out/scaling"
