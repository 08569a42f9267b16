#!/usr/bin/env bash
# The committed H100 benchmark record (docs/benchmarks/h100-bench/): run on the GPU machine from
# the repository root, with the peers' wheels installed (liger-kernel, cut-cross-entropy).
#   bash scripts/h100_bench.sh OUTDIR [heads|scaling|variants|all]
set -euo pipefail
out=${1:-bench-results}
part=${2:-all}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
bench="python3 -m fused_cel.bench"
fused='fused_cel,fused_cel[memory_budget_mib=64],fused_cel[memory_budget_mib=256],fused_cel[memory_budget_mib=1024]'
methods="plain,compile,liger,cce,$fused"
if [[ $part == heads || $part == all ]]; then
    $bench --preset llama3-8b --preset gemma2-2b --preset mistral-7b --preset gpt2 --methods "$methods" --out "$out/heads"
    $bench --preset qwen2.5-7b --tokens 16384 --methods "$methods" --out "$out/qwen16k"
fi
if [[ $part == scaling || $part == all ]]; then
    $bench --preset llama3-8b --tokens 1024 --tokens 4096 --tokens 16384 --tokens 65536 --tokens 131072 \
        --methods "fused_cel,fused_cel[memory_budget_mib=3100],fused_cel[memory_budget_mib=64],liger" --out "$out/scaling"
fi
if [[ $part == variants || $part == all ]]; then
    # frozen weight (LoRA: logits + dX only), fp16, fp32, fp32 weights under bf16 autocast
    $bench --preset llama3-8b --frozen-weight --methods "plain,compile,liger,$fused" --out "$out/frozen"
    for dtype in fp16 fp32; do
        $bench --preset llama3-8b --dtype $dtype --methods "plain,compile,fused_cel" --out "$out/$dtype"
    done
    $bench --preset llama3-8b --autocast --methods "plain,compile,fused_cel" --out "$out/autocast"
fi
