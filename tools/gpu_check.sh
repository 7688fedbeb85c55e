#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR: the one prepared GPU run of issue 14 (item 3), about 8 minutes on one H100/H200.
#
# Writes under OUTDIR (each step's JSON and log, then summary.json with every step's exit status and seconds):
#   environment.json     nvidia-smi, torch, CUDA and cuDNN versions, bf16 support
#   bundles_epoch.json   every bundle trains one epoch and evaluates it with its configs/gpu.json: teacher, KD student
#                        (online; cached after its cache step), the 3 ensemble members and the ensemble, the
#                        omni-student; stages run side by side (python -m tools.bench bundles-epoch)
#   throughput_64.json   python -m tools.bench train-throughput at 64^3 (the paper's size), batch 2
#   throughput_128.json  the same at 128^3
#   paper_fold.json      the paper preset's teacher, baseline and student trainings on fold 0 of a 285-case phantom,
#                        3 epochs each, timed per epoch; the full 500-epoch time is EXTRAPOLATED from them (first
#                        epoch + 499 x the median later epoch), not measured (python -m tools.bench paper-fold)
#   compile_64.json      train-throughput at 64^3 with torch.compile variants of teacher and baseline, if time is left
#
# Phantom size of the paper fold: 128^3, not BraTS's 240x240x155. Generating one 240-size phantom case takes
# about 13 s on one CPU core (285 cases: about 1 h on one core, 4 min on 16), a 128-size case 1.75 s (285 cases:
# about 30 s on 16 cores). The paper preset crops 128^3 and resizes to 64^3 before caching, so training and
# validation see 64^3 tensors either way; only the one-time cache fill reads smaller files.
#
# Installs nothing and needs no network: run it in the repository with its .venv (PYTHON overrides the interpreter).
# Environment:
#   GPU_CHECK_DEVICE=cpu   dry run of the same steps on the CPU with tiny sizes (no compile step)
#   GPU_CHECK_STEPS        steps to run, default "environment bundles throughput paper compile"
#   GPU_CHECK_BUDGET_S     wall-time budget in seconds (default 470; 3600 for the dry run); a step is cut to what is
#                          left of it, and skipped (recorded as such) when less than a minute is left
#   GPU_CHECK_CAP_SCALE    multiplies every step's own time cap (default 1; 8 for the dry run)
set -uo pipefail

usage() { echo "usage: $0 OUTDIR   (GPU_CHECK_DEVICE=cpu for a dry run on the CPU)" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-environment bundles throughput paper compile}
if [ "$DEVICE" = cpu ]; then  # the dry run: a small shared CPU is far slower than the GPU the caps are sized for
    BUDGET=${GPU_CHECK_BUDGET_S:-3600}
    CAP_SCALE=${GPU_CHECK_CAP_SCALE:-8}
else
    BUDGET=${GPU_CHECK_BUDGET_S:-470}
    CAP_SCALE=${GPU_CHECK_CAP_SCALE:-1}
fi

if [ ! -x "$PY" ]; then
    echo "gpu_check: no Python interpreter at $PY (carry the repository's .venv, or set PYTHON)" >&2
    exit 2
fi
case $DEVICE in
    cuda)
        if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            echo "gpu_check: CUDA is not available to $PY (torch.cuda.is_available() is False); nothing was run." >&2
            echo "gpu_check: on a machine without a GPU, GPU_CHECK_DEVICE=cpu runs a dry run with tiny sizes." >&2
            exit 3
        fi ;;
    cpu) ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
STATUS="$OUT/status.tsv"
: > "$STATUS"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    BUNDLES_ARGS=(--cases 9 --phantom-size 128 --jobs 5)
    TP_SIZES=(64 128)
    TP_ARGS=(--batch-size 2 --steps 30 --warmup 5 --block 5 --cases 16 --phantom-size 128)
    PAPER_ARGS=(--cases 285 --phantom-size 128 --epochs 3)
else
    BUNDLES_ARGS=(--cases 9 --phantom-size 32 --tiny true --jobs 2)
    TP_SIZES=(16)
    TP_ARGS=(--batch-size 2 --steps 2 --warmup 1 --block 2 --cases 8 --filters "[4,8,16,32]" --num-workers 0)
    PAPER_ARGS=(--cases 12 --phantom-size 32 --epochs 2 --tiny true)
fi

wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run NAME CAP_S COMMAND...: run COMMAND (its output in OUTDIR/NAME.log) for at most CAP_S seconds and what is
# left of the budget; record NAME, exit status and seconds in status.tsv (124 = cut by the time limit)
run() {
    local name=$1 cap=$(($2 * CAP_SCALE)) left start rc
    shift 2
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 60 ]; then
        printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
        echo "gpu_check: $name skipped: ${left}s of the budget left" >&2
        return 0
    fi
    [ "$cap" -lt "$left" ] || cap=$left
    echo "gpu_check: $name (at most ${cap}s) ..." >&2
    start=$SECONDS
    timeout --kill-after=15 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STATUS"
    echo "gpu_check: $name exit $rc after $((SECONDS - start))s" >&2
}

if wants environment; then
    run environment 60 "$PY" - "$OUT/environment.json" "$DEVICE" <<'EOF'
import json, subprocess, sys
import torch, monai
device = sys.argv[2]
info = {"device": device, "torch": torch.__version__, "monai": monai.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
if device == "cuda":
    info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count(),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not run: {err}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
fi
if wants bundles; then
    run bundles_epoch 150 "$PY" -m tools.bench bundles-epoch --json "$OUT/bundles_epoch.json" --device "$DEVICE" "${BUNDLES_ARGS[@]}"
fi
if wants throughput; then
    for size in "${TP_SIZES[@]}"; do
        run "throughput_$size" 75 "$PY" -m tools.bench train-throughput --json "$OUT/throughput_$size.json" --device "$DEVICE" \
            --spatial-size "$size" "${TP_ARGS[@]}"
    done
fi
if wants paper; then
    run paper_fold 200 "$PY" -m tools.bench paper-fold --json "$OUT/paper_fold.json" --device "$DEVICE" "${PAPER_ARGS[@]}"
fi
if wants compile && [ "$DEVICE" = cuda ]; then
    run compile_64 200 "$PY" -m tools.bench train-throughput --json "$OUT/compile_64.json" --device cuda --spatial-size 64 \
        --compile true "${TP_ARGS[@]}"
fi

"$PY" - "$STATUS" "$OUT/summary.json" "$SECONDS" "$DEVICE" <<'EOF'
import json, sys
steps = {}
for line in open(sys.argv[1]):
    name, code, seconds = line.rstrip("\n").split("\t")
    steps[name] = {"exit": code if code == "skipped" else int(code), "seconds": int(seconds),
                   "timed_out": code == "124"}
out = sys.argv[2].rsplit("/", 1)[0]
for name, step in steps.items():  # a step that ran but whose own JSON says a part failed (bundles, paper fold)
    try:
        step["all_ok"] = json.load(open(f"{out}/{name}.json")).get("all_ok", True)
    except (OSError, ValueError):
        pass
ok = all(s["exit"] == 0 and s.get("all_ok", True) for s in steps.values())
summary = {"device": sys.argv[4], "all_ok": ok, "wall_s": int(sys.argv[3]), "steps": steps}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
EOF
