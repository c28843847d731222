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
# Writes $OUT/gpu_check.json (summary: the verdict, the environment — python, torch, its
# CUDA, fastft._C's CUDA runtime, the driver, the GPU — and the benchmark figures),
# $OUT/gpu_check.log (everything printed), $OUT/environment.json, $OUT/kernels.json,
# $OUT/bench_gpu.json, $OUT/gpu_tests.{txt,xml}; $OUT defaults to .benchmarks/results
# (git-ignored: a check never writes tracked files).
#
# Before any test or benchmark it proves that fastft's CUDA kernels are the ones running
# (fastft._C has them, fastft.has_cuda(), and a small write and gather on CUDA tensors
# were served by them, not by the pure-PyTorch reference); if not, it stops with the
# verdict "no CUDA kernels running" and why, so nothing is measured on the reference.
#
# Dry run: GPU_CHECK_DRY_RUN=1, or no GPU visible. It records the environment, checks the
# toolchain, skips the build (the fastft already installed for $PY is checked; nothing is
# reinstalled) and ends with the verdict: exit 3 where, as without a GPU, the kernels
# cannot run. tests/test_gpu_readiness.py runs it.
#
# Exit status: 0 all steps passed (a dry run: the kernels would run); 1 a step failed;
# 2 nothing to check here (no torch, no nvcc, missing build tools); 3 fastft's CUDA kernels
# are not the ones running (no GPU, a driver older than fastft's CUDA runtime, fastft._C
# without CUDA, ops served by the reference). gpu_check.json says which ("verdict").
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
export VERDICT=""
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
out = {"exit_code": code, "verdict": os.environ.get("VERDICT", ""), "steps": steps}
for name in ("environment", "kernels"):
    path = os.path.join(results, f"{name}.json")
    if os.path.exists(path):
        out[name] = json.load(open(path))
bench = os.path.join(results, "bench_gpu.json")
if os.path.exists(bench):
    out["bench"] = json.load(open(bench))
path = os.path.join(results, "gpu_check.json")
json.dump(out, open(path, "w"), indent=2)
print(f"wrote {path}")
EOF
  rm -f "$STEPS"
  echo "VERDICT: ${VERDICT:-(none)}"
  echo "=== gpu_check finished with status $code after $(elapsed)s (log: $LOG)"
  exit "$code"
}

# ---------------------------------------------------------------- 1. Python, torch, GPU
banner "environment"
if ! "$PY" -c "import torch" 2>/dev/null; then
  export VERDICT="nothing checked: $PY cannot import torch"
  record environment no_torch "$PY cannot import torch; set PYTHON=/path/to/python with PyTorch"
  finish 2
fi
# Versions and the GPU into environment.json (and gpu_check.json): what the figures came from.
DRIVER_SMI=$( (command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) || true)
ENV_OUT=$(DRIVER_SMI="$DRIVER_SMI" "$PY" - "$RESULTS/environment.json" <<'EOF'
import ctypes, json, os, platform, sys, torch
env = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "driver_version": os.environ.get("DRIVER_SMI") or None,
    "gpus": [],
}
try:  # the newest CUDA version the driver runs (e.g. 12080), from libcuda itself
    lib, v = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(v))
    env["driver_cuda"] = v.value
except OSError:
    env["driver_cuda"] = 0  # no driver installed
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    mem = round(p.total_memory / 2**30, 1)
    env["gpus"].append({"name": p.name, "memory_gib": mem, "sm": f"{p.major}{p.minor}"})
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
print("DEVICE=" + (env["gpus"][0]["name"] if env["cuda_available"] and env["gpus"] else ""))
EOF
)
echo "$ENV_OUT"
DEVICE="${ENV_OUT##*DEVICE=}"
# GPU_CHECK_DRY_RUN=1 (or no GPU): no build; the installed fastft is checked (see the top).
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ -z "$DEVICE" ]; then
  record environment no_gpu "torch.cuda.is_available() is False: no GPU (or no driver) visible; dry run"
  DRY=1
  DEVICE="no GPU"
fi
record environment ok "$DEVICE"

# Whether fastft's CUDA kernels serve CUDA tensors: fastft._C has them, has_cuda(), and a
# write and a gather on CUDA tensors were served by them (backend_calls). Writes
# kernels.json; stops with exit 3 and the verdict when they are not the ones running.
check_kernels() {
  local out
  out=$("$PY" - "$RESULTS/kernels.json" 2>&1 <<'EOF'
import json, os, sys, warnings
import torch
import fastft, fastft.ops
from fastft import _native
info = fastft.build_info()
k = {
    "fastft": os.path.dirname(fastft.__file__),
    "native": info.get("native"),
    "built_with_cuda": bool(info.get("cuda")),
    "cuda_version": info.get("cuda_version"),
    "cuda_archs": info.get("cuda_archs"),
    "has_cuda": fastft.has_cuda(),
    "cuda_problem": info.get("cuda_problem"),
}
mod = _native.native_module()
if mod is not None and hasattr(mod, "cuda_runtime_info"):
    k["cuda_runtime"] = mod.cuda_runtime_info()  # fastft._C's own runtime, and the driver
if k["has_cuda"]:
    dev = torch.device("cuda")
    fastft.ops.backend_calls(reset=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dst, scales = torch.zeros(4, 8, dtype=torch.int8, device=dev), torch.zeros(4, device=dev)
        rows = torch.arange(2, device=dev)
        fastft.ops.cache_write(torch.randn(2, 3, 8, device=dev), rows, dst, scales, "mean")
        fastft.ops.cache_gather(dst, scales, rows)
        torch.cuda.synchronize()
    served = {f"{op}:{b}": n for (op, b), n in fastft.ops.backend_calls(reset=True).items()}
    k["served"] = served
    if served != {"cache_write:cuda": 1, "cache_gather:cuda": 1}:
        why = "; ".join(str(w.message) for w in caught)
        k["cuda_problem"] = f"the ops on CUDA tensors were served by {served} {why}".strip()
json.dump(k, open(sys.argv[1], "w"), indent=2)
print(json.dumps(k))
ok = k["has_cuda"] and not k.get("cuda_problem")
print("KERNELS_OK" if ok else f"KERNELS_NOT_RUNNING: {k.get('cuda_problem')}")
EOF
  ) || true
  echo "$out"
  case "$out" in
    *KERNELS_OK*)
      export VERDICT="fastft's CUDA kernels are running on $DEVICE"
      record kernels ok "" ;;
    *KERNELS_NOT_RUNNING*)
      local why="${out##*KERNELS_NOT_RUNNING: }"
      why="${why%.}"
      export VERDICT="no CUDA kernels running: $why. Nothing was tested or benchmarked on a GPU."
      record kernels not_running "$why"
      finish 3 ;;
    *)
      export VERDICT="no CUDA kernels running: the check itself failed (see the log)"
      record kernels check_failed "$(echo "$out" | tail -1)"
      finish 3 ;;
  esac
}

# ---------------------------------------------------------------- 2. nvcc and build tools
banner "toolchain"
# The newest CUDA version the driver runs (e.g. 12080 for 12.8), from libcuda itself.
DRIVER_CUDA=$(sed -n 's/.*"driver_cuda": \([0-9]*\).*/\1/p' "$RESULTS/environment.json")
DRIVER_CUDA=${DRIVER_CUDA:-0}
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
  [ "$DRY" = 1 ] || { export VERDICT="nothing checked: no nvcc to build the CUDA kernels"; finish 2; }
elif [ -z "$NVCC" ]; then
  NVCC=$NEWEST NVCC_VER=$NEWEST_VER
  echo "WARNING: every nvcc here is newer than the driver; the CUDA kernels will fall back to PyTorch"
fi
echo "using ${NVCC:-(none)}"
missing=""
"$PY" -c "import scikit_build_core" 2>/dev/null || missing="$missing scikit-build-core"
"$PY" -c "import pybind11" 2>/dev/null || missing="$missing pybind11"
"$PY" -c "import pytest" 2>/dev/null || missing="$missing pytest"
command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || missing="$missing cmake"
"$PY" -m pip --version >/dev/null 2>&1 || missing="$missing pip"
if [ -n "$missing" ]; then
  record toolchain missing_tools "not importable/installed:$missing. Install them into $PY (offline: pip install --no-index --find-links <wheel dir>$missing)"
  [ "$DRY" = 1 ] || { export VERDICT="nothing checked: build tools missing:$missing"; finish 1; }
elif [ -n "$NVCC" ]; then
  record toolchain ok "nvcc $((NVCC_VER / 1000)).$((NVCC_VER % 1000 / 10)) at $NVCC"
fi

# ---------------------------------------------------------------- 3. build
if [ "$DRY" = 1 ]; then
  banner "build skipped (dry run): checking the fastft installed for $PY"
  record build skipped_dry_run "nothing built or installed"
  check_kernels  # exits 3 with the verdict unless the kernels run
  export VERDICT="dry run: $VERDICT (nothing was built, tested or benchmarked)"
  finish 0
fi
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
record build ok ""
banner "are fastft's CUDA kernels the ones running?"
check_kernels  # exits 3 with the verdict unless they are

# ---------------------------------------------------------------- 4. tests
banner "CUDA tests"
t=$(( $(remaining) - 200 )); [ "$t" -gt 240 ] && t=240
if [ "$t" -lt 30 ]; then
  record tests no_time "only $(remaining)s left"
else
  set +e
  timeout "$t" "$PY" -m pytest tests/test_ops_cuda.py tests/test_ops_errors.py tests/test_gpu_pipeline.py \
    tests/test_ops_cuda_host.py tests/test_gpu_readiness.py -q -rfEs \
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
  export VERDICT="$VERDICT; but a step failed (see steps)"
  finish 1
fi
export VERDICT="$VERDICT; the CUDA tests and benchmarks passed"
finish 0
