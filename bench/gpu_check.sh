#!/usr/bin/env bash
# One go on a machine with a CUDA GPU: the `gpu` tests and the GPU benchmarks.
#
#   bench/gpu_check.sh OUTDIR
#
# Writes into OUTDIR: gpu_check.log (this script's own log), one <stage>.log per
# stage, stages.txt (stage name and exit code), tests.xml (JUnit) and
# gpu_bench.json (figures).  Each stage has its own time limit and a failing
# stage does not stop the next; the limits add up to 8 minutes.  Exits 1 if a
# stage other than env/wheels failed.
# Wheels the machine lacks (lmdb, zstandard, kvikio...) are installed from .whl/
# at the repository root when present (bench/fetch_gpu_wheels.sh downloads them).
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
# The project's venv when there is one (as the README's commands use), else python3.
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
START=$SECONDS
: > "$OUT/stages.txt"

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }

# stage NAME LIMIT_S CMD...: runs CMD under a time limit, output to OUT/NAME.log.
stage() {
    local name=$1 limit=$2
    shift 2
    log "stage $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    log "stage $name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
    echo "$name $rc" >>"$OUT/stages.txt"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    return $rc
}

stage env 40 bash -c "
    nvidia-smi || true
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\")'
    $PY -c 'import cupy; print(\"cupy\", cupy.__version__)' || true
    $PY -m pip list 2>/dev/null | grep -i -E '^(torch|cupy|kvikio|libkvikio|numpy|grpcio|protobuf|xxhash|lmdb|zstandard|pytest|psutil) ' || true
    df -hT /tmp '$ROOT' || true
    nproc; free -g || true"

if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    log "no .whl/ wheels: kvikio, lmdb and zstandard may be missing (bench/fetch_gpu_wheels.sh)"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

stage nvrtc 40 "$PY" -m kernels.nvrtc_check

TESTS=(tests/kernels tests/kvstore/test_gpu_tier.py tests/kvstore/test_paged_io.py tests/loader/test_gpu.py)
if ! stage tests 140 "$PY" -m pytest -m gpu -q -ra --continue-on-collection-errors \
        --junitxml "$OUT/tests.xml" "${TESTS[@]}"; then
    # Tell real failures from warnings that filterwarnings=error turned into errors.
    stage tests_warnings_default 35 "$PY" -m pytest -m gpu -q -ra --lf -W default "${TESTS[@]}"
fi

mkdir -p "$ROOT/.bench_tmp"  # on the disk the repository is on, not a tmpfs
stage bench 170 "$PY" -m bench.gpu_bench --out "$OUT/gpu_bench.json" --data-dir "$ROOT/.bench_tmp"
rm -rf "$ROOT/.bench_tmp"

log "done in $((SECONDS - START))s; stages: $(tr '\n' ' ' <"$OUT/stages.txt")"
# Exit status: 1 when a stage that checks something failed (env and wheels only report).
failed=$(awk '$1 != "env" && $1 != "wheels" && $2 != 0 {print $1}' "$OUT/stages.txt" | tr '\n' ' ')
if [[ -n $failed ]]; then
    log "FAILED stages: $failed(see their .log files in $OUT)"
    exit 1
fi
