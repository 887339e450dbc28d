#!/usr/bin/env bash
# Sets up a fresh checkout: a virtual environment in .venv with torch and the test
# and benchmark dependencies, then builds llmfast and its C++/CUDA extension in place.
# Safe to re-run: pip skips what is installed and ninja rebuilds only what changed.
# LLMFAST_BUILD_CUDA=0 skips the CUDA kernels (a CPU-only build, about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: the extension compiles against the torch just installed.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -m llmfast info
