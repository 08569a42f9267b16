#!/usr/bin/env bash
# The H200 benchmark record (docs/benchmarks/h200-bench/): run on the GPU machine from the repository
# root, with the peers' wheels in .whl-bench (liger-kernel 0.8.5, cut-cross-entropy, trl 1.16.0).
#   bash scripts/h200_bench.sh OUTDIR
# Every head with no label ignored (the floor's own work), then with half of them ignored (SFT
# prompts; torch.compile's time does not depend on it, so it runs once).
set -euo pipefail
out=${1:-bench-results}
if ls .whl-bench/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site .whl-bench/*.whl
    export PYTHONPATH=/tmp/bench-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
bench="python3 -m fused_cel.bench --reps 5 --warmup 2"
fused='fused_cel,fused_cel[memory_budget_mib=64]'
for ignored in 0 0.5; do
    methods="liger,cce,trl,$fused"
    [[ $ignored == 0 ]] && methods="compile,$methods"
    $bench --preset llama3-8b --preset gemma2-2b --preset mistral-7b --ignored $ignored --methods "$methods" \
        --out "$out/heads-ignored$ignored"
    $bench --preset qwen2.5-7b --tokens 16384 --ignored $ignored --methods "$methods" --out "$out/qwen16k-ignored$ignored"
done
