#!/usr/bin/env bash
# One lent-GPU session in one command: install, report the environment, run the kernel and
# closed-form tests on CUDA, run the benchmarks, and leave logs and result files in $OUT.
#
#   bash benchmarks/gpu_session.sh [quick|full] [--no-tests] [--collect-only]
#
# quick (default): the benchmarks of the largest cross-attention layer at batch 2 (4096 queries x
#   head dim 40, every prompt / mode / timing / provider: 32 cases) and the closed-form SD1.x cases
#   (17); with the tests, about 5 to 7 minutes on an H200 (an estimate: not yet timed there).
# full: every benchmark (`python -m pytest benchmarks/`); the cross-attention one alone is sized
#   for about 8 minutes, so use it with --no-tests, in a call of its own.
# --no-tests: skip the test step.
# --collect-only: install nothing and run nothing: show the environment and collect the selected
#   tests and benchmarks (safe on a machine without a GPU).
#
# The device tool (see /work/.library/device/README.md): the command runs in the repository root
# with $OUT set; the working tree travels, git-ignored paths only when named in `carry`.
# Preparation on the calling machine, once, in the repository root (`/.whl/` is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# (the device image has every other dependency, and no diffusers; without the wheel the tests that
# build the tiny pipeline skip). Then:
#   run(command="bash benchmarks/gpu_session.sh quick", carry=[".whl"], timeout_s=600)
# The script stops each step at the time left under BUDGET_S seconds (default 570, for
# timeout_s=600), interrupting pytest so that it still writes the results it has.
# Comes back under $OUT (8 files at most): summary.txt, setup.log, env.txt, tests.log, bench.log
# and results/<op>-<gpu>-<date>.json; copy the JSON files into benchmarks/results/ to keep them.
# Exit status: 0 when every step passed, 1 otherwise (the summary names the failed steps).

set -uo pipefail

MODE=quick
RUN_TESTS=1
COLLECT_ONLY=0
for arg in "$@"; do
    case "$arg" in
        quick | full) MODE=$arg ;;
        --no-tests) RUN_TESTS=0 ;;
        --collect-only) COLLECT_ONLY=1 ;;
        *) echo "usage: bash benchmarks/gpu_session.sh [quick|full] [--no-tests] [--collect-only]" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d)
    echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
START=$(date +%s)
STARTED=$(mktemp)  # results newer than this file are this run's
STEPS=()
FAILED=0

seconds_left() { echo $((START + BUDGET_S - 20 - $(date +%s))); }  # 20 s kept for the summary

# step NAME LOG COMMAND...: runs COMMAND (a program, or one of the functions below) with its output
# shown and appended to $OUT/LOG, stopped with SIGINT (pytest then still finishes its session and
# writes its results) when the budget runs out.
step() {
    local name=$1 logname=$2 left rc
    local log=$OUT/$logname
    shift 2
    if declare -F "$1" >/dev/null; then
        set -- bash -c "$1"  # timeout runs programs; the functions are exported below
    fi
    left=$(seconds_left)
    if [ "$left" -le 10 ]; then
        STEPS+=("$name: NOT RUN (budget spent)")
        FAILED=1
        echo "!!! $name: not run, the time budget is spent" >&2
        return 1
    fi
    echo "=== $name ($(date -u +%H:%M:%S), ${left}s left)" | tee -a "$log"
    timeout -s INT -k 15 "$left" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        STEPS+=("$name: ok ($(($(date +%s) - START))s elapsed)")
    else
        [ "$rc" -eq 124 ] && rc="$rc, stopped at the time budget"
        STEPS+=("$name: FAILED (exit $rc; see $logname)")
        FAILED=1
        echo "!!! $name FAILED (exit $rc)" >&2
    fi
    return 0
}

install_diffusers() {
    if "$PYTHON" -c "import diffusers" 2>/dev/null; then
        echo "diffusers is installed"
    elif compgen -G ".whl/*.whl" >/dev/null; then
        # As the device README says: the carried wheels into their own folder, first on the path.
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        PYTHONPATH=/tmp/site "$PYTHON" -c "import diffusers; print('diffusers', diffusers.__version__, 'from the carried wheel')"
    else
        echo "diffusers is missing and no wheel was carried (.whl/): the tests that build the tiny pipeline will skip"
    fi
}

install_project() {
    echo "nvcc: $(command -v nvcc || echo 'not found')"; nvcc --version 2>/dev/null | tail -n 2
    "$PYTHON" -c "import setuptools, torch; print('setuptools', setuptools.__version__, '| torch', torch.__version__, 'CUDA', torch.version.cuda)"
    local status=0 pip_log=/tmp/pip-install-fasterase.log
    # setup.py builds fasterase._C (csrc/) when torch is a CUDA build and nvcc is found, else says
    # why not; pip's whole output (compiler lines included) goes to setup.log only.
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    "$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps -e . >"$pip_log" 2>&1
    status=$?
    cat "$pip_log" >>"$OUT/setup.log"
    grep -E "fasterase: skipping|Successfully installed" "$pip_log"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$pip_log"
        # So that the tests still run: the extension built in place, and kernels/ where the
        # installed package would have it (setup.py maps kernels/ to fasterase.kernels).
        echo "!!! pip install -e failed; fallback: setup.py build_ext --inplace and a link fasterase/kernels -> ../kernels"
        "$PYTHON" setup.py build_ext --inplace >>"$OUT/setup.log" 2>&1 || echo "!!! setup.py build_ext --inplace failed too"
        ln -sfn ../kernels fasterase/kernels
    fi
    "$PYTHON" - <<'PY'
try:
    import fasterase._C
    print("CUDA extension: BUILT,", fasterase._C.__file__)
except ImportError as error:
    print("CUDA extension: NOT BUILT:", error)
PY
    return "$status"
}

gpu_facts() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda available', torch.cuda.is_available())"
}

export OUT PYTHON
export -f install_diffusers install_project gpu_facts

summarize() {
    "$PYTHON" - "$OUT/results" <<'PY'
"""One line per triton (cross-attention) or ours (closed-form) result of this run."""
import json
import sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*.json")):
    run = json.loads(path.read_text())
    rows = run["rows"]
    print(f"\n== {run['op']}: {run['gpu']}, torch {run['torch']}, triton {run['triton']}, CUDA {run['cuda']}, {run['date']}")
    if run["op"] == "cross_attention":
        def case(row):  # test_cross_attention[4096x40-2-text-fwd-plain-triton] -> 4096x40-2-text-fwd-plain
            return row["test"].split("[")[1].rsplit("-", 1)[0]

        torch_peak = {case(r): r["peak_mb"] for r in rows if r["params"]["provider"] == "torch"}
        graph_only = len(rows) > 64  # a full run: the graph timings alone fit the device tool's output
        print(f"{'case (layer-batch-keys-mode-timing)':44} {'triton us':>10} {'x torch':>8} {'x sdpa':>7} {'x onehot':>8} {'MB ours/torch':>14}")
        for r in rows:
            if r["params"]["provider"] != "triton" or (graph_only and r["params"]["timing"] != "graph"):
                continue
            speed = [f"{r[k]:.2f}" if k in r else "-" for k in ("speedup_vs_torch", "speedup_vs_sdpa", "speedup_vs_onehot")]
            peaks = f"{r['peak_mb']:.0f}/{torch_peak.get(case(r), float('nan')):.0f}"
            print(f"{case(r):44} {r['step_us']:10.1f} {speed[0]:>8} {speed[1]:>7} {speed[2]:>8} {peaks:>14}")
        if graph_only:
            print("(graph timings only; every row is in the JSON file)")
    else:
        print(f"{'case':34} {'ours ms':>9} {'ref ms':>9} {'speedup':>8}  target")
        for r in rows:
            case = r["test"].split("[")[0].removeprefix("test_") + "[" + r["test"].split("[")[1]
            verdict = "met" if r.get("target_met") else "NOT met"
            print(f"{case:34} {r['ours_ms']:9.2f} {r['reference_ms']:9.2f} {r['speedup']:8.2f}  {r.get('target', '')}: {verdict}")
PY
}

COLLECT=()
[ "$COLLECT_ONLY" -eq 1 ] && COLLECT=(--collect-only)

if [ "$COLLECT_ONLY" -eq 0 ]; then
    step "install diffusers" setup.log install_diffusers
    [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    step "install fasterase (builds the CUDA extension)" setup.log install_project
fi
step "environment" env.txt gpu_facts
step "fasterase env" env.txt "$PYTHON" -m fasterase.cli env

if [ "$RUN_TESTS" -eq 1 ]; then
    # Test processes in parallel: a fresh machine compiles every Triton kernel variant first.
    WORKERS=()
    if [ "$COLLECT_ONLY" -eq 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        WORKERS=(-n "${TEST_WORKERS:-8}")
    fi
    step "tests (tests/kernels, tests/test_closed_form.py)" tests.log \
        "$PYTHON" -m pytest -q -p no:cacheprovider -rs --durations=15 "${WORKERS[@]}" "${COLLECT[@]}" \
        tests/kernels tests/test_closed_form.py
fi

if [ "$MODE" = quick ]; then
    step "benchmarks (quick: cross-attention 4096x40 batch 2, closed form SD1.x)" bench.log \
        "$PYTHON" -m pytest -q -p no:cacheprovider -rs --benchmark-columns=median,rounds "${COLLECT[@]}" \
        benchmarks/bench_cross_attention.py benchmarks/bench_closed_form.py -k "4096x40-2- or sd1"
else
    step "benchmarks (full)" bench.log \
        "$PYTHON" -m pytest -q -p no:cacheprovider -rs --benchmark-columns=median,rounds "${COLLECT[@]}" benchmarks/
fi

find benchmarks/results -name '*.json' -newer "$STARTED" -exec cp {} "$OUT/results/" \; 2>/dev/null
rm -f "$STARTED"
{
    summarize
    echo
    echo "== gpu_session.sh $MODE$([ "$RUN_TESTS" -eq 0 ] && echo ' --no-tests')$([ "$COLLECT_ONLY" -eq 1 ] && echo ' --collect-only'), $(($(date +%s) - START))s"
    grep -hE "^CUDA extension:|^diffusers |^(triton|diffusers) +|^ridge_solve \[cuda\]|^cross_attention \[triton\]" "$OUT/setup.log" "$OUT/env.txt" 2>/dev/null
    [ -f "$OUT/tests.log" ] && echo "tests: $(grep -E '(passed|failed|error|no tests ran|selected|collected)' "$OUT/tests.log" | tail -n 1)"
    [ -f "$OUT/bench.log" ] && echo "benchmarks: $(grep -E '(passed|failed|error|no tests ran|selected|collected)' "$OUT/bench.log" | tail -n 1)"
    printf '%s\n' "${STEPS[@]}"
    echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
} 2>&1 | tee "$OUT/summary.txt"
exit "$FAILED"
