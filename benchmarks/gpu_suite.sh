#!/usr/bin/env bash
# The GPU suite in one command: the GPU tests and every benchmark, each table and a log written into OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR                 # on a CUDA machine (H100): the real run
#   bash benchmarks/gpu_suite.sh OUTDIR --dry-run       # any CPU, a few minutes: every step with its tiny/smoke flags
#   bash benchmarks/gpu_suite.sh OUTDIR --only decode,step_profile   # a subset (names below)
#
# Steps (in this order): pytest_gpu (pytest -m gpu -q tests), fp8_gemm, train_step, decode, step_profile.
# Each step's stdout and stderr go to OUTDIR/<step>.log; its tables to OUTDIR (fp8_gemm.md, train_step.md/.json,
# decode.md/.json, step_profile.md/.json, pytest_gpu.txt). OUTDIR/log.txt records the date, host, GPU (nvidia-smi),
# driver, CUDA, python/torch/transformers/triton versions, the git commit, and per step its command, duration and
# exit status. A failing step is recorded and the suite goes on; the exit status is 1 if any step failed.
# In --dry-run, pytest only collects the GPU tests (--collect-only), and fp8_gemm (which needs an FP8 GPU and has
# no CPU mode) counts as skipped when it exits with 2 ("no GPU").
# Python: $PYTHON if set, else the repository's .venv/bin/python if present, else python.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

OUTDIR=""
DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only) shift; ONLY="${1:-}" ;;
        --only=*) ONLY="${1#--only=}" ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) if [ -z "$OUTDIR" ]; then OUTDIR="$1"; else echo "unexpected argument: $1" >&2; exit 2; fi ;;
    esac
    shift
done
if [ -z "$OUTDIR" ]; then usage >&2; exit 2; fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO" || exit 2
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="python"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LOG="$OUTDIR/log.txt"

{
    echo "# gpu_suite $( [ $DRY_RUN = 1 ] && echo '(dry run: tiny/smoke flags)' || echo '(full run)' )"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname 2>/dev/null || echo '?') · $(uname -srm)"
    echo "command: bash benchmarks/gpu_suite.sh $OUTDIR$( [ $DRY_RUN = 1 ] && echo ' --dry-run')${ONLY:+ --only $ONLY}"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo '?')$( [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ] && echo ' (working tree has changes)')"
    echo "python: $PY"
    echo
    echo "## device"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
        echo
        nvidia-smi 2>&1
    else
        echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') ($(nproc 2>/dev/null || echo '?') cores)"
    echo
    echo "## versions"
    "$PY" - <<'EOF' 2>&1
import platform
import torch
print(f"python {platform.python_version()}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})")
print(f"cuda available: {torch.cuda.is_available()}" + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})" if torch.cuda.is_available() else ""))
for name in ("transformers", "triton", "safetensors", "accelerate", "modeling_deepseek_v3"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '(no __version__)')}")
    except Exception as error:  # noqa: BLE001
        print(f"{name}: not importable ({type(error).__name__}: {error})")
EOF
    echo
    echo "## steps"
} > "$LOG"

FAILED=()
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# run_step NAME SKIP_RC COMMAND...   (SKIP_RC: an exit status that means "skipped", or "" for none)
run_step() {
    local name="$1" skip_rc="$2"
    shift 2
    wanted "$name" || return 0
    local start end rc status
    echo "[$(date -u +%H:%M:%S)] $name: $*" | tee -a "$LOG"
    start=$(date +%s)
    "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    if [ $rc -eq 0 ]; then
        status="ok"
    elif [ -n "$skip_rc" ] && [ $rc -eq "$skip_rc" ]; then
        status="skipped (exit $rc: $(tail -n 1 "$OUTDIR/$name.log" | cut -c1-200))"
    else
        status="FAILED (exit $rc)"
        FAILED+=("$name")
    fi
    echo "    $status after $((end - start)) s; output in $name.log" | tee -a "$LOG"
    if [[ $status == FAILED* ]]; then
        tail -n 15 "$OUTDIR/$name.log" | sed 's/^/    | /' >> "$LOG"
    fi
}

if [ $DRY_RUN = 1 ]; then
    # collect the GPU tests without running them (on a GPU machine they would run for real)
    run_step pytest_gpu "" "$PY" -m pytest -m gpu -q -p no:cacheprovider --collect-only tests
    run_step fp8_gemm 2 "$PY" benchmarks/fp8_gemm.py --quick --out "$OUTDIR/fp8_gemm.md"
    run_step train_step "" "$PY" benchmarks/train_step.py --tiny --steps 1 --out "$OUTDIR"
    run_step decode "" "$PY" benchmarks/decode.py --tiny --new-tokens 4 --batches 1 2 --contexts 24 --mtp-steps 10 \
        --out "$OUTDIR/decode"
    # one row of ours beside transformers' is enough to check the wiring (tests/test_step_profile_benchmark.py runs
    # every --tiny row on its own)
    run_step step_profile "" "$PY" benchmarks/step_profile.py --tiny --experts grouped_mm --mla-modes absorbed \
        --out "$OUTDIR/step_profile.json"
else
    run_step pytest_gpu "" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --junitxml="$OUTDIR/pytest_gpu.xml"
    run_step fp8_gemm "" "$PY" benchmarks/fp8_gemm.py --out "$OUTDIR/fp8_gemm.md"
    run_step train_step "" "$PY" benchmarks/train_step.py --out "$OUTDIR"
    run_step decode "" "$PY" benchmarks/decode.py --out "$OUTDIR/decode"
    run_step step_profile "" "$PY" benchmarks/step_profile.py --experts eager,batched_mm,grouped_mm,deepseek_fp8 \
        --out "$OUTDIR/step_profile.json"
fi
# pytest's summary as a table file of its own
if [ -f "$OUTDIR/pytest_gpu.log" ]; then
    tail -n 30 "$OUTDIR/pytest_gpu.log" > "$OUTDIR/pytest_gpu.txt"
fi

{
    echo
    echo "## result"
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "all steps ok or skipped"
    else
        echo "failed: ${FAILED[*]}"
    fi
    echo "finished: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
} >> "$LOG"
echo "wrote $OUTDIR (log.txt$(cd "$OUTDIR" && ls -1 *.md *.json *.txt 2>/dev/null | grep -v '^log.txt$' | sed 's/^/, /' | tr -d '\n'))"
if [ ${#FAILED[@]} -ne 0 ]; then
    echo "failed steps: ${FAILED[*]} (see $LOG)" >&2
    exit 1
fi
exit 0
