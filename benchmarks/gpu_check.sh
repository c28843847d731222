#!/usr/bin/env bash
# GPU check of fastft: build with the CUDA kernels, run the CUDA tests, run the GPU benchmarks.
#
#   bash benchmarks/gpu_check.sh
#
# For a machine with an NVIDIA GPU, PyTorch (CUDA build) preinstalled and no internet. Needs
# nvcc (CUDA toolkit), cmake, and the Python packages scikit-build-core, pybind11, pytest; it
# says which one is missing. fastft is installed editable (`pip install -e .`, no build
# isolation, no dependencies, no index) into the Python that has torch ($PYTHON, default
# python3). Ends within 8 minutes.
#
# Writes $OUT/gpu_check.json (summary, with the benchmark figures), $OUT/gpu_check.log
# (everything printed), $OUT/bench_gpu.json, $OUT/gpu_tests.{txt,xml}; $OUT defaults to
# .benchmarks/results (git-ignored: a check never writes tracked files).
# Exit status: 0 all steps passed, 1 a step failed, 2 nothing to check here (no GPU, no torch,
# no nvcc); the JSON says which.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${OUT:-.benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
STEPS="$RESULTS/gpu_check.steps"  # "name<TAB>status<TAB>seconds<TAB>detail" per step
: >"$LOG"
: >"$STEPS"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET=465  # seconds for everything (8 minutes, less a margin for the summary)

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((BUDGET - $(elapsed))); }
banner() { echo; echo "=== $1   [t=$(elapsed)s]"; }
record() { # name status detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(elapsed)" "${3//$'\t'/ }" >>"$STEPS"
  echo "--> $1: $2${3:+ ($3)}"
}

# Summarise the steps (and the benchmark JSON, when there is one) into gpu_check.json.
finish() {
  local code=$1
  "$PY" - "$STEPS" "$RESULTS" "$code" <<'EOF' || echo "could not write gpu_check.json"
import json, os, sys
steps_path, results, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
for line in open(steps_path):
    name, status, seconds, detail = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
    steps.append({"step": name, "status": status, "t_s": int(seconds), "detail": detail})
out = {"exit_code": code, "steps": steps}
bench = os.path.join(results, "bench_gpu.json")
if os.path.exists(bench):
    out["bench"] = json.load(open(bench))
path = os.path.join(results, "gpu_check.json")
json.dump(out, open(path, "w"), indent=2)
print(f"wrote {path}")
EOF
  rm -f "$STEPS"
  echo "=== gpu_check finished with status $code after $(elapsed)s (log: $LOG)"
  exit "$code"
}

# ---------------------------------------------------------------- 1. Python, torch, GPU
banner "environment"
if ! "$PY" -c "import torch" 2>/dev/null; then
  record environment no_torch "$PY cannot import torch; set PYTHON=/path/to/python with PyTorch"
  finish 2
fi
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("CUDA available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
# GPU_CHECK_DRY_RUN=1 walks through every step without a GPU (to test this script).
DRY="${GPU_CHECK_DRY_RUN:-0}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  record environment no_gpu "torch.cuda.is_available() is False: no GPU (or no driver) visible"
  [ "$DRY" = 1 ] || finish 2
  DEVICE="none (dry run)"
else
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
fi
record environment ok "$DEVICE"

# ---------------------------------------------------------------- 2. nvcc and build tools
banner "toolchain"
# The newest CUDA version the driver runs (e.g. 12080 for 12.8), from libcuda itself.
DRIVER_CUDA=$("$PY" - <<'EOF'
import ctypes
try:
    lib, v = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(v))
    print(v.value)
except OSError:
    print(0)
EOF
)
echo "driver supports CUDA $((DRIVER_CUDA / 1000)).$((DRIVER_CUDA % 1000 / 10))"
nvcc_version() { # prints e.g. 12080 for release 12.8
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' |
    awk '{ print $1 * 1000 + $2 * 10 }' || true
}
# Candidates: $CUDACXX, nvcc on PATH, /usr/local/cuda*. Pick the newest the driver can run
# (fastft links the runtime statically: a newer one fails with "insufficient driver").
NVCC="" NVCC_VER=0 NEWEST="" NEWEST_VER=0
for cand in "${CUDACXX:-}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
  [ -n "$cand" ] && [ -x "$cand" ] || continue
  ver=$(nvcc_version "$cand")
  [ -n "$ver" ] || continue
  echo "found nvcc $((ver / 1000)).$((ver % 1000 / 10)) at $cand"
  if [ "$ver" -gt "$NEWEST_VER" ]; then NEWEST=$cand NEWEST_VER=$ver; fi
  if [ "$ver" -le "$DRIVER_CUDA" ] && [ "$ver" -gt "$NVCC_VER" ]; then NVCC=$cand NVCC_VER=$ver; fi
done
if [ -z "$NEWEST" ]; then
  record toolchain no_nvcc "no nvcc found (CUDACXX, PATH, /usr/local/cuda*); install the CUDA toolkit or set CUDACXX"
  finish 2
fi
if [ -z "$NVCC" ]; then
  NVCC=$NEWEST NVCC_VER=$NEWEST_VER
  echo "WARNING: every nvcc here is newer than the driver; the CUDA kernels will fall back to PyTorch"
fi
echo "using $NVCC"
missing=""
"$PY" -c "import scikit_build_core" 2>/dev/null || missing="$missing scikit-build-core"
"$PY" -c "import pybind11" 2>/dev/null || missing="$missing pybind11"
"$PY" -c "import pytest" 2>/dev/null || missing="$missing pytest"
command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || missing="$missing cmake"
"$PY" -m pip --version >/dev/null 2>&1 || missing="$missing pip"
if [ -n "$missing" ]; then
  record toolchain missing_tools "not importable/installed:$missing. Install them into $PY (offline: pip install --no-index --find-links <wheel dir>$missing)"
  finish 1
fi
record toolchain ok "nvcc $((NVCC_VER / 1000)).$((NVCC_VER % 1000 / 10)) at $NVCC"

# ---------------------------------------------------------------- 3. build
banner "build (pip install --no-build-isolation -e .)"
jobs=$(nproc 2>/dev/null || echo 4)
# Only this GPU's architecture (e.g. 90 on an H100/H200): a third of the default build's
# device code, so the build leaves the tests their time. FASTFT_CUDA_ARCHS set outside wins.
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}{n}')" 2>/dev/null || true)
export FASTFT_CUDA_ARCHS="${FASTFT_CUDA_ARCHS:-${ARCH:-75;80;90}}"
echo "CUDA architectures: $FASTFT_CUDA_ARCHS"
# Its own build folder: CMake wipes a cache configured with another nvcc. PIP_BREAK_SYSTEM_
# PACKAGES: a distro Python refuses installs otherwise (the machine is ours).
if CUDACXX="$NVCC" FASTFT_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$jobs" PIP_BREAK_SYSTEM_PACKAGES=1 \
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  --config-settings=build-dir="build/gpu-check/{wheel_tag}" -e . ; then
  :
else
  record build failed "pip install exited with $? (see the log above)"
  finish 1
fi
INFO=$("$PY" -c "import fastft, json; i = fastft.build_info(); print(json.dumps({k: i.get(k) for k in ('native', 'cuda', 'cuda_archs', 'cuda_version')}), fastft.has_cuda())" 2>&1 | tail -1 || true)
echo "fastft: $INFO"
case "$INFO" in
  *'"cuda": true'*True) record build ok "$INFO" ;;
  *'"cuda": true'*) [ "$DRY" = 1 ] && record build ok_without_gpu "$INFO" || { record build no_usable_cuda "$INFO"; finish 1; } ;;
  *) record build no_cuda_kernels "$INFO"; finish 1 ;;
esac

# ---------------------------------------------------------------- 4. tests
banner "CUDA tests"
t=$(( $(remaining) - 200 )); [ "$t" -gt 240 ] && t=240
if [ "$t" -lt 30 ]; then
  record tests no_time "only $(remaining)s left"
else
  set +e
  timeout "$t" "$PY" -m pytest tests/test_ops_cuda.py tests/test_ops_errors.py tests/test_gpu_pipeline.py -q -rfEs \
    -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml" >"$RESULTS/gpu_tests.txt" 2>&1
  rc=$?
  set -e
  cat "$RESULTS/gpu_tests.txt"
  summary=$(tail -1 "$RESULTS/gpu_tests.txt" | tr -d '=' | sed 's/^ *//')
  if [ "$rc" -eq 0 ]; then record tests ok "$summary"
  elif [ "$rc" -eq 124 ]; then record tests timeout "over ${t}s"
  else record tests failed "$summary"; fi
fi

# ---------------------------------------------------------------- 5. benchmarks
banner "benchmarks"
t=$(( $(remaining) - 5 ))
extra=()
[ "$t" -lt 180 ] && extra+=(--skip-e2e) && echo "(skipping end-to-end: ${t}s left)"
if [ "$t" -lt 20 ]; then
  record bench no_time "only $(remaining)s left"
else
  set +e
  timeout "$t" "$PY" benchmarks/bench_gpu.py --json "$RESULTS/bench_gpu.json" ${extra[@]+"${extra[@]}"}
  rc=$?
  set -e
  case $rc in
    0) record bench ok "" ;;
    124) record bench timeout "over ${t}s" ;;
    *) record bench failed "exit $rc" ;;
  esac
fi

if awk -F'\t' '$2 == "failed" || $2 == "timeout" || $2 == "no_time" { bad = 1 } END { exit !bad }' "$STEPS"; then
  finish 1
fi
finish 0
