"""Per-call CPU time of fused_cel's op before and after the schema change (27 -> 16 arguments).

    mkdir -p /tmp/before && git archive 4d745f2 src | tar -x -C /tmp/before   # one argument per option
    python experiments/op-schema/ab.py /tmp/before/src src

Alternates the two source trees, three rounds, each in a fresh process: torch's fill_defaults on the
forward op's schema (what its autograd wrapper runs on every call), and a tiny forward + backward on
the torch backend (64 tokens, D=16, V=256, shift, 10 labels ignored), best and median of 7 x 300 calls.
"""

import os
import subprocess
import sys

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import fused_cel
from fused_cel import op
from torch._library import utils
assert fused_cel.__file__.startswith(sys.argv[1]), fused_cel.__file__
schema = op.forward_op._opoverload._schema
args = tuple(range(len(schema.arguments)))
fill = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(1000):
        utils.fill_defaults(schema, args, {})
    fill.append((time.perf_counter() - t) * 1e3)
torch.manual_seed(0)
x = torch.randn(1, 64, 16, requires_grad=True)
w = torch.randn(256, 16, requires_grad=True)
y = torch.randint(0, 256, (1, 64))
y[0, :10] = -100
def call():
    fused_cel.linear_cross_entropy(x, w, y, shift=True, backend="torch").backward()
for _ in range(100):
    call()
calls = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(300):
        call()
    calls.append((time.perf_counter() - t) / 300 * 1e3)
print(f"{len(schema.arguments)} args  fill_defaults {min(fill):6.1f} us  "
      f"call best {min(calls):.3f} median {statistics.median(calls):.3f} ms")
"""

for round_ in range(3):
    for src in map(os.path.abspath, sys.argv[1:]):
        out = subprocess.run([sys.executable, "-c", CHILD, src], capture_output=True, text=True, check=True).stdout
        print(f"round {round_ + 1}  {src:<24} {out.strip()}", flush=True)
