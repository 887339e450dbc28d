#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (no package registry there): build
# for the local GPU, run the tests on CUDA, `llmfast check` and `llmfast bench` on
# CUDA, and leave logs and results under $OUT (default ./gpu-results).
# Budget: about 8 minutes on an H200; each step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 LLMFAST_TEST_DEVICE=cuda
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  return $rc
}

cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
step build 240 env LLMFAST_BUILD_CUDA=1 LLMFAST_BUILD_EMU=0 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || { tail -40 "$OUT/build.log"; exit 1; }
step info 30 "$PY" -m llmfast info
step tests 150 "$PY" -m pytest tests -m "not slow and not ddp" -q -x -p no:cacheprovider
step check 60 "$PY" -m llmfast check --device cuda
step bench 200 "$PY" -m llmfast bench --quick --device cuda --dtype bf16 --dtype fp32 --out "$OUT/bench"
tail -5 "$OUT/tests.log" "$OUT/check.log"; tail -60 "$OUT/bench.log"
cat "$OUT/summary.txt"
# The device tool brings back at most 8 files: pack the logs and results into one.
tar -czf "$OUT/results.tar.gz" -C "$OUT" --exclude=results.tar.gz --exclude=summary.txt . && \
  find "$OUT" -mindepth 1 ! -name results.tar.gz ! -name summary.txt -delete
