#!/usr/bin/env bash
# Issue 13's speed check on one GPU: the bench before (BEFORE_SRC: the source tree of the commit
# before the restructuring, extracted with `git archive <commit> src | tar -x -C .before`) and
# after (this tree's src/), alternated in two rounds in one machine session. Writes OUTDIR/ab.csv
# (every bench row, with its side and round) and prints a table of the fused_cel rows.
#   bash experiments/refactor-ab/ab.sh OUTDIR [BEFORE_SRC]
set -euo pipefail
out=${1:?OUTDIR}
before=${2:-.before/src}
work=$(mktemp -d)
methods='fused_cel,fused_cel[memory_budget_mib=64]'
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
for round in 1 2; do
    for side in before after; do
        src=$([[ $side == before ]] && echo "$before" || echo src)
        PYTHONPATH=$src python3 -m fused_cel.bench --preset llama3-8b --preset gemma2-2b --methods "$methods" \
            --error-tokens 512 --out "$work/$side-$round-8k" > "$work/$side-$round-8k.log"
        PYTHONPATH=$src python3 -m fused_cel.bench --preset qwen2.5-7b --tokens 16384 --methods "$methods" \
            --error-tokens 512 --out "$work/$side-$round-qwen16k" > "$work/$side-$round-qwen16k.log"
        echo "round $round $side done"
    done
done
python3 - "$work" "$out" <<'PY'
import csv, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = []
for d in sorted(p for p in work.iterdir() if p.is_dir()):
    side, rnd, part = d.name.split("-", 2)
    for r in csv.DictReader(open(d / "results.csv")):
        rows.append({"side": side, "round": rnd, **r})
with open(out / "ab.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"{'shape':<14}{'method':<34}{'before ms':>20}{'after ms':>20}{'MiB b/a':>14}")
keys = dict.fromkeys((r["shape"], r["method"]) for r in rows)
for shape, method in keys:
    got = {s: [r for r in rows if (r["shape"], r["method"], r["side"]) == (shape, method, s)] for s in ("before", "after")}
    ms = {s: "/".join(f"{float(r['ms']):.2f}" for r in v) for s, v in got.items()}
    mib = "/".join(f"{float(v[0]['extra_mib']):.0f}" if v and v[0].get("extra_mib") else "-" for v in got.values())
    print(f"{shape:<14}{method:<34}{ms['before']:>20}{ms['after']:>20}{mib:>14}")
PY
