#!/usr/bin/env bash
# Sets up .venv from nothing and runs the test suite. torch==2.13.0 is the CPU build on this
# kind of machine (a local file); CI must never download the multi-GB CUDA builds, so torch is
# installed first, pinned, and the package after it (its torch>=2.11 is then already met).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# DeepSpeed (tests/test_distributed.py runs ZeRO-3 on its CPU accelerator) is an sdist whose build
# imports torch: build it against the torch above, with no compiled ops.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation deepspeed
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
