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
# unsloth (tests/test_unsloth.py) pins transformers<=5.17 and trl<=1.15, below the versions above, so
# its tests run in an environment of their own, built and run in the background while the main
# suite runs (fused_cel from src/ on PYTHONPATH: no second build in the repo). unsloth's dependencies
# include xformers, bitsandbytes and torchvision, which would bring a CUDA torch and nvidia-* wheels:
# unsloth and unsloth_zoo go in without dependencies, after the ones they import on a CPU machine,
# and the constraint keeps any of them from replacing the CPU torch. FUSED_CEL_REQUIRE_UNSLOTH=1: a
# failed import of unsloth is an error there, not a skip (in .venv the file skips: no unsloth).
# Only for the whole suite (no arguments), as CI runs it.
unsloth_suite() {
    python3 -m venv .venv-unsloth
    .venv-unsloth/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
    .venv-unsloth/bin/python -m pip install -q --disable-pip-version-check -c <(echo torch==2.13.0) \
        "triton>=3.6" "transformers<=5.17" "trl<=1.15" "datasets<5" "peft>=0.18" "accelerate>=0.34.1" pytest \
        tyro sentencepiece protobuf psutil packaging wheel numpy tqdm regex msgspec pillow einops hf_transfer
    .venv-unsloth/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        unsloth==2026.10.9 unsloth_zoo==2026.10.9
    PYTHONPATH=src FUSED_CEL_REQUIRE_UNSLOTH=1 .venv-unsloth/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_unsloth.py
}
unsloth=
if [ "$#" -eq 0 ]; then
    unsloth_suite > .venv-unsloth.log 2>&1 &
    unsloth=$!
fi
status=0
# Two workers (pytest-xdist), as CI's machine has two cores; a later -n N in "$@" overrides it.
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@" || status=$?
if [ -n "$unsloth" ]; then
    wait "$unsloth" || status=$?
    echo "--- tests/test_unsloth.py in .venv-unsloth:"
    cat .venv-unsloth.log
fi
exit "$status"
