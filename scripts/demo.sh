#!/usr/bin/env bash
# Sets up .venv from nothing (CPU torch, see test.sh) and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[demo]"
exec .venv/bin/python -m fused_cel.demo "$@"
