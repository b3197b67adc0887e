#!/usr/bin/env bash
# What a GPU session runs on the device machine (an H200, or an H100), one part per device call:
#
#     bash benchmarks/gpu_session.sh PART [OUTDIR]       PART: all | check | bench | epoch | search
#
# Before the session (here, with network): benchmarks/device_wheels.sh fills .whl/ with what the device
# lacks (Opacus, Optuna, ...). A task now has 15 device minutes in all, its machine's start (a minute or
# more), idle waits and every retry included, and no machine starts with under 4 minutes left. So the
# whole table is one call, `all`, that stops starting steps after 330 s and ends within its 390 s limit, so
# that a machine's start (up to 2 minutes), the call and one rerun of it fit in the 15 minutes:
#
# run: {"command": "bash benchmarks/gpu_session.sh all", "carry": [".whl"], "timeout_s": 390, "kind": "nvidia-h200"}
#
# (the issue asks for the H200's table; on an H100, which a call that names no kind gets, set DPNAS_TAG=h100)
#
# `all` runs, most needed first, each step capped (seconds) so that one slow step cannot starve the rest:
#   test_gpu (75)         tests/test_gpu.py on the device (privacy properties in CUDA)
#   smoke_train (45)      dpnas train smoothnet, 1 epoch of synthetic data
#   bench_smoothnet (100) dpnas bench: nonprivate, opacus, dpnas x fp32, bf16, channels_last, bf16+channels_last
#                         (the bf16 / channels-last default question), 10 steps at batch 256
#   epoch (70)            benchmarks/epoch_throughput.py, the three reference models, 5120 samples, B 256
#   search (90)           benchmarks/search_throughput.py, 8 one-epoch trials on 12800 synthetic samples,
#                         workers 1,2,4 (trials sharing the GPU against one after another)
#   bench_resnet9_scalenorm, bench_wrn16_4 (50 each)   dpnas bench: the three modes in fp32 and bf16+channels_last
# A step that is not reached inside the part's budget (DPNAS_PART_BUDGET_S, 330 s for `all`) is named at the
# end (exit 3), and a step stopped by its cap keeps the rows it finished (bench, epoch and search rewrite their
# JSON after each case, model or arm). Rerun what is missing warm, at once (the machine stays warm only 30 s),
# with the full-size part that holds it, narrowed, e.g. for one model's bench:
#   DPNAS_MODELS=wrn16_4 DPNAS_BENCH_MODES=nonprivate,opacus,dpnas DPNAS_BENCH_STEPS=10 \
#   DPNAS_BENCH_VARIANTS=fp32,bf16+channels_last bash benchmarks/gpu_session.sh bench      (timeout_s 300)
# then `give_back`. Nothing here has run on a GPU yet: every size above is an estimate from the CPU timings in
# benchmarks/RESULTS.md and a CPU rehearsal (below).
#
# Parts (all sizes are the defaults; the environment variables in brackets override them):
#   all     the steps above, 8 files in OUTDIR (all.log, test_gpu.xml, smoke_train.json, ${TAG}_bench_<model>.json
#           for the three models, ${TAG}_epoch.json, ${TAG}_search.json)
#   check   python/torch/CUDA versions and nvidia-smi; tests/test_gpu.py (if present); a GPU smoke run:
#           dpnas train smoothnet [DPNAS_SMOKE_MODEL] --dataset synthetic --epochs 1 [DPNAS_SMOKE_EPOCHS]
#   bench   dpnas bench, batch 256 [DPNAS_BENCH_BATCH], 20 steps [DPNAS_BENCH_STEPS], modes
#           [DPNAS_BENCH_MODES], variants fp32,bf16,channels_last,bf16+channels_last [DPNAS_BENCH_VARIANTS;
#           empty: no --variants flag]. One `dpnas bench` per model, each with its own JSON: 6 modes x 4
#           variants, Opacus in fp32 only = 21 subprocess cases per model (each pays Python, torch and CUDA
#           start-up), so more than one model per call risks the 10-minute limit; a model stopped by the
#           time limit keeps the cases it finished.
#   epoch   benchmarks/epoch_throughput.py per model, 50000 samples [DPNAS_EPOCH_SAMPLES], B 256
#           [DPNAS_EPOCH_BATCH], physical 256 [DPNAS_EPOCH_PHYSICAL]; DPNAS_EPOCH_SET=amp=true,channels_last=true
#           gives dpnas's side those TrainConfig fields (Opacus's baseline stays fp32)
#   search  benchmarks/search_throughput.py, synthetic 50000 [DPNAS_SEARCH_SIZE], 16 trials
#           [DPNAS_SEARCH_TRIALS] of 1 epoch [DPNAS_SEARCH_EPOCHS], workers 1,2,4 [DPNAS_SEARCH_WORKERS]
#   check, bench, epoch and search are the full-size parts of a 30-minute session (6 calls), kept for a task
#   lent more time, and for reruns at a chosen size.
# Common: DPNAS_MODELS (smoothnet,resnet9_scalenorm,wrn16_4; bench and epoch), DPNAS_DEVICE (cuda),
# DPNAS_TAG (h200: prefix of the JSON files; name the card that ran them), DPNAS_PART_BUDGET_S (330 for
# `all`, else 540), DPNAS_SITE (/tmp/site: where .whl/ is installed), DPNAS_DRY_RUN=1 (print the commands,
# run nothing, install nothing).
#
# OUTDIR: $OUT on the device (what is written there comes back: at most 8 files), else benchmarks/gpu_out
# (git-ignored). A CPU rehearsal of `all` (4 minutes on 2 cores), e.g. with a Python 3.12 venv holding
# only what the device has:
#   DPNAS_DEVICE=cpu DPNAS_TAG=cpu DPNAS_REHEARSAL=1 bash benchmarks/gpu_session.sh all
# (DPNAS_REHEARSAL=1: `all` at CPU sizes: tiny models, a few steps, a few hundred samples.)
set -uo pipefail  # no -e: a failed step is reported, and the part goes on to its next step

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARTS="all check bench epoch search"

if [[ $# -lt 1 || $# -gt 2 || " $PARTS " != *" $1 "* ]]; then
    [[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
    echo "usage: $0 {${PARTS// /|}} [OUTDIR]   (--help: the run calls and the settings)" >&2
    exit 2
fi
PART=$1
OUTDIR=${2:-${OUT:-$REPO/benchmarks/gpu_out}}

DEVICE=${DPNAS_DEVICE:-cuda}
TAG=${DPNAS_TAG:-h200}
MODELS=${DPNAS_MODELS:-smoothnet,resnet9_scalenorm,wrn16_4}
BUDGET_S=${DPNAS_PART_BUDGET_S:-$([[ $PART == all ]] && echo 330 || echo 540)}
MIN_STEP_S=30  # do not start a step with less time than this left
SITE=${DPNAS_SITE:-/tmp/site}
DRY_RUN=${DPNAS_DRY_RUN:-}

export PYTHONUNBUFFERED=1  # the log is all a killed call returns: let nothing sit in a buffer
# dpnas is not installed there: run it from the working tree; the carried wheels come first
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}

FAILED=()
SKIPPED=()

# step NAME COMMAND...: run one command under what is left of the part's time budget (and under _step_cap_s
# seconds where the caller set it, as `all` does), logged with its time.
step() {
    local name=$1; shift
    local left=$((BUDGET_S - SECONDS))
    local limit=$left
    if [[ -n ${_step_cap_s:-} ]] && ((_step_cap_s < left)); then
        limit=$_step_cap_s
    fi
    if ((left < MIN_STEP_S)); then
        echo "=== SKIPPED $name: ${left} s left of the part's ${BUDGET_S} s"
        SKIPPED+=("$name")
        return
    fi
    echo "=== $name: $(date -u +%H:%M:%S) UTC, ${left} s left, at most ${limit} s"
    if [[ -n $DRY_RUN ]]; then
        echo "DRY-RUN: $(printf '%q ' "$@")"
        return
    fi
    echo "\$ $*"
    local start=$SECONDS rc
    # TERM, not INT: on Ctrl-C `dpnas train` finishes its step and epoch_throughput.py then starts its Opacus
    # epoch. bench, epoch_throughput.py and search_throughput.py have written (atomically) every case, model or
    # arm they finished; the rest has nothing on disk to wait for.
    # timeout signals its whole process group: bench's case processes and search's workers go too.
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name (out of time)")
    elif ((rc != 0)); then
        FAILED+=("$name (exit $rc)")
    fi
}

setup() {
    # Install the carried wheels (pure Python, and SQLAlchemy's cp312 build) next to the image's packages.
    if [[ -n $DRY_RUN ]]; then
        return 0
    fi
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        local stamp wanted
        stamp=$SITE/.dpnas-wheels
        wanted=$(cd "$REPO/.whl" && ls -l -- *.whl)
        if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
            echo "wheels already installed in $SITE"  # a warm machine keeps /tmp between calls
        else
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$REPO"/.whl/*.whl || { echo "error: installing .whl/*.whl failed"; return 1; }
            echo "$wanted" >"$stamp"
            echo "installed $(cd "$REPO/.whl" && ls -- *.whl | tr '\n' ' ')into $SITE"
        fi
    else
        echo "no .whl/ here: using only what python3 already has (run benchmarks/device_wheels.sh and carry .whl)"
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi
    # versions, and a clear message now rather than an ImportError in the middle of a step
    python3 - "$SITE" <<'PY'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
missing = []
for name in ("numpy", "scipy", "pandas", "sklearn", "tqdm", "opacus", "optuna", "optuna_dashboard", "sqlalchemy", "alembic"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("error: missing: " + ", ".join(missing) + "; run benchmarks/device_wheels.sh here and carry .whl")
# the carried wheels were installed with --no-deps: check their needs against the image's versions
from importlib.metadata import distributions, version, PackageNotFoundError
from packaging.requirements import Requirement
for dist in distributions(path=[sys.argv[1]]):  # what was installed from .whl/
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            print(f"  WARNING: {dist.metadata['Name']} requires {req}, found {have}")
import dpnas.cli  # noqa: E402,F401  what `python3 -m dpnas` imports before it parses its arguments
PY
}

part_check() {
    if [[ -f tests/test_gpu.py ]]; then
        # DPNAS_TEST_DEVICE: test_gpu.py runs on the CPU too, for a rehearsal with DPNAS_DEVICE=cpu
        DPNAS_TEST_DEVICE=${DPNAS_TEST_DEVICE:-$DEVICE} step test_gpu \
            python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml="$OUTDIR/test_gpu.xml"
    else
        echo "=== tests/test_gpu.py does not exist (yet): skipped"
    fi
    step smoke_train python3 -m dpnas train "${DPNAS_SMOKE_MODEL:-smoothnet}" --dataset synthetic \
        --epochs "${DPNAS_SMOKE_EPOCHS:-1}" --device "$DEVICE" --out "$OUTDIR/smoke_train.json"
}

part_bench() {
    local variants=${DPNAS_BENCH_VARIANTS-fp32,bf16,channels_last,bf16+channels_last} model
    local extra=()
    if [[ -n $variants ]]; then
        extra=(--variants "$variants")
    fi
    for model in ${MODELS//,/ }; do
        step "bench_$model" python3 -m dpnas bench --device "$DEVICE" --batch-size "${DPNAS_BENCH_BATCH:-256}" \
            --steps "${DPNAS_BENCH_STEPS:-20}" --models "$model" \
            --modes "${DPNAS_BENCH_MODES:-nonprivate,opacus,dpnas,dpnas_unfold,dpnas_grouped,dpnas_ghost}" \
            "${extra[@]}" --json "$OUTDIR/${TAG}_bench_$model.json"
    done
}

part_epoch() {
    local model assignment
    local options=()  # DPNAS_EPOCH_SET=amp=true,channels_last=true: dpnas's side of the epoch with those levers
    for assignment in ${DPNAS_EPOCH_SET:+${DPNAS_EPOCH_SET//,/ }}; do
        options+=(--set "$assignment")
    done
    for model in ${MODELS//,/ }; do
        step "epoch_$model" python3 benchmarks/epoch_throughput.py --device "$DEVICE" --model "$model" \
            --samples "${DPNAS_EPOCH_SAMPLES:-50000}" --batch-size "${DPNAS_EPOCH_BATCH:-256}" \
            --physical "${DPNAS_EPOCH_PHYSICAL:-256}" "${options[@]}" --json "$OUTDIR/${TAG}_epoch_$model.json"
    done
}

part_search() {
    step search python3 benchmarks/search_throughput.py --device "$DEVICE" \
        --synthetic-size "${DPNAS_SEARCH_SIZE:-50000}" --trials "${DPNAS_SEARCH_TRIALS:-16}" \
        --epochs "${DPNAS_SEARCH_EPOCHS:-1}" --workers "${DPNAS_SEARCH_WORKERS:-1,2,4}" --json "$OUTDIR/${TAG}_search.json"
}

part_all() {
    # Sizes: the device's, or the CPU's for a rehearsal (DPNAS_REHEARSAL=1). A step's cap is _step_cap_s, set
    # for the call in front of it (bash keeps such an assignment for the function it precedes, and step reads it).
    local models=smoothnet,resnet9_scalenorm,wrn16_4 batch=256 steps=10 samples=5120 search_size=12800 trials=8
    local search_workers=1,2,4 smoke=smoothnet
    if [[ -n ${DPNAS_REHEARSAL:-} ]]; then
        models=tiny,smoothnet_w80d10,resnet9 batch=8 steps=2 samples=256 search_size=640 trials=2 search_workers=1,2
        smoke=tiny
    fi
    local first=${models%%,*} rest=${models#*,}
    local modes=nonprivate,opacus,dpnas
    if [[ -f tests/test_gpu.py ]]; then
        DPNAS_TEST_DEVICE=${DPNAS_TEST_DEVICE:-$DEVICE} _step_cap_s=75 step test_gpu \
            python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml="$OUTDIR/test_gpu.xml"
    fi
    _step_cap_s=45 step smoke_train python3 -m dpnas train "$smoke" --dataset synthetic --epochs 1 --device "$DEVICE" \
        --out "$OUTDIR/smoke_train.json"
    _step_cap_s=100 MODELS=$first DPNAS_BENCH_BATCH=$batch DPNAS_BENCH_STEPS=$steps DPNAS_BENCH_MODES=$modes \
        DPNAS_BENCH_VARIANTS=fp32,bf16,channels_last,bf16+channels_last part_bench
    # one JSON for the three models (part epoch writes one per model; the device returns at most 8 files)
    _step_cap_s=70 step epoch python3 benchmarks/epoch_throughput.py --device "$DEVICE" --model "$models" \
        --samples "$samples" --batch-size "$batch" --physical "$batch" --json "$OUTDIR/${TAG}_epoch.json"
    _step_cap_s=90 DPNAS_SEARCH_SIZE=$search_size DPNAS_SEARCH_TRIALS=$trials DPNAS_SEARCH_EPOCHS=1 \
        DPNAS_SEARCH_WORKERS=$search_workers part_search
    _step_cap_s=50 MODELS=$rest DPNAS_BENCH_BATCH=$batch DPNAS_BENCH_STEPS=$steps DPNAS_BENCH_MODES=$modes \
        DPNAS_BENCH_VARIANTS=fp32,bf16+channels_last part_bench
}

main() {
    echo "=== gpu_session.sh $PART: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    echo "OUTDIR=$OUTDIR DEVICE=$DEVICE MODELS=$MODELS budget ${BUDGET_S} s"
    setup || return 2
    "part_$PART"
    echo "=== $PART done after $SECONDS s; files in $OUTDIR:"
    ls -l "$OUTDIR"
    local count
    count=$(find "$OUTDIR" -type f | wc -l)
    ((count <= 8)) || echo "WARNING: $count files in $OUTDIR; the device returns at most 8"
    ((${#SKIPPED[@]})) && echo "OUT OF TIME, not started: ${SKIPPED[*]} (rerun them in another call, e.g. with DPNAS_MODELS=...)"
    ((${#FAILED[@]})) && echo "FAILED: ${FAILED[*]}"
    if ((${#FAILED[@]})); then
        return 1
    elif ((${#SKIPPED[@]})); then
        return 3
    fi
    echo "OK"
}

mkdir -p "$OUTDIR" || exit 2
cd "$REPO" || exit 2
# `; exit` on this line: bash reads a script while it runs it, so an edit to this file during a run can't add more
main 2>&1 | tee -a "$OUTDIR/$PART.log"; exit
