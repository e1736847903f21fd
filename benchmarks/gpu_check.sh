#!/usr/bin/env bash
# The GPU check, in about 8 minutes: the test suite on the GPU backend, `python -m benchmarks
# --quick`, then `python -m benchmarks.gpu` (jbn, flax and torch's cuDNN batch norm; a
# ResNet-50 train step). Each step writes its log under $OUT, runs under its own time limit and
# may fail without stopping the next; a summary comes last (and goes to $OUT/summary.txt).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Needs jax with CUDA, flax, optax, equinox, pytest, pytest-xdist and hypothesis; torch is
# optional. Installs nothing; runs from the repository root with PYTHONPATH=. (jbn need not be
# installed). Settings (environment): PYTHON (default python), GPU_CHECK_STEPS (default
# "env tests bench gpu"), GPU_CHECK_TESTS (pytest paths, default tests), GPU_CHECK_WORKERS
# (pytest-xdist workers, default 4), GPU_CHECK_MAXFAIL (default 10), GPU_CHECK_BATCH (ResNet-50
# batch, default: gpu.py's, 256 on a GPU), GPU_CHECK_TINY=1 (both benchmarks with --tiny: a dry
# run of this script on a CPU), and the limits in seconds TIMEOUT_ENV (30), TIMEOUT_TESTS (180),
# TIMEOUT_BENCH (100), TIMEOUT_GPU (180): 490 s in all.
set -u

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT" || exit 2
PY=${PYTHON:-python}
STEPS=${GPU_CHECK_STEPS:-env tests bench gpu}
SIZE=$([ "${GPU_CHECK_TINY:-0}" = 1 ] && echo --tiny || echo --quick)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Several processes (pytest workers) and two frameworks (jax, torch) share one GPU: allocate on
# demand instead of taking 75% of the memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# torch's OpenMP threads must not busy-wait between the interleaved timings (benchmarks/run.py).
export OMP_WAIT_POLICY=PASSIVE

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, under `timeout`.
# SIGINT first, so that pytest still prints its failures when its time runs out; SIGKILL 20 s
# later if the command does not stop.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*"
    timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 130 | 137) status="TIMED OUT after ${limit} s (rc $rc)" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    printf '%-6s %-40s %4d s  log: %s\n' "$name" "$status" "$(($(date +%s) - t0))" \
        "$OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
}

# The devices and versions, for the env step.
env_report() {
    nvidia-smi
    "$PY" - <<'EOF'
import importlib.util

import jax

print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
print("device_kind", jax.devices()[0].device_kind)
for name in ("jaxlib", "flax", "optax", "equinox", "hypothesis", "xdist", "torch"):
    found = importlib.util.find_spec(name) is not None
    print(name, getattr(__import__(name), "__version__", "?") if found else None)
if importlib.util.find_spec("torch") is not None:
    import torch

    cuda = torch.cuda.is_available()
    print("torch cuda", cuda, torch.cuda.get_device_name(0) if cuda else "")
EOF
}
export -f env_report
export PY

for s in $STEPS; do
    case $s in
        env)
            step env "${TIMEOUT_ENV:-30}" bash -c env_report
            ;;
        tests)
            # 4 workers (GPU_CHECK_WORKERS=0 for one process): 500 tests, mostly compile-bound,
            # do not fit the limit in one process; memory is allocated on demand (above).
            # test_gpu_check.py runs gpu.py --tiny, which the gpu step below covers for real;
            # test_xla_cpu.py skips itself off the CPU backend. The multi-device tests run on
            # the 4 virtual CPU devices that tests/conftest.py asks XLA for.
            # shellcheck disable=SC2086 # GPU_CHECK_TESTS is a list of paths
            step tests "${TIMEOUT_TESTS:-180}" "$PY" -m pytest ${GPU_CHECK_TESTS:-tests} -q \
                -p no:cacheprovider -m "not slow" -n "${GPU_CHECK_WORKERS:-4}" \
                --maxfail="${GPU_CHECK_MAXFAIL:-10}" -rfE --tb=short --durations=15 \
                --junitxml="$OUT/tests.xml" --ignore=tests/benchmarks/test_gpu_check.py
            ;;
        bench)
            # No torch here: benchmarks/layer.py runs torch on the CPU; gpu.py times it on CUDA.
            step bench "${TIMEOUT_BENCH:-100}" "$PY" -m benchmarks "$SIZE" --out "$OUT/bench" \
                --impls jbn jbn_out flax flax_slowvar naive
            ;;
        gpu)
            # shellcheck disable=SC2046 # --tiny or nothing
            step gpu "${TIMEOUT_GPU:-180}" "$PY" -m benchmarks.gpu --out "$OUT/gpu" \
                $([ "$SIZE" = --tiny ] && echo --tiny) \
                ${GPU_CHECK_BATCH:+--batch "$GPU_CHECK_BATCH"}
            ;;
        *)
            echo "unknown step '$s' in GPU_CHECK_STEPS (expected env, tests, bench, gpu)" |
                tee -a "$SUMMARY"
            ;;
    esac
done

echo
echo "== summary ($(($(date +%s) - START)) s in all; results under $OUT)"
cat "$SUMMARY"
if [ -f "$OUT/tests.log" ]; then
    echo "-- tests:"
    grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed)|no tests ran' "$OUT/tests.log" | tail -n 15
fi
for md in "$OUT/gpu/gpu.md" "$OUT/bench/results.md"; do
    if [ -f "$md" ]; then
        echo "-- $md:"
        head -n 40 "$md"
    fi
done
