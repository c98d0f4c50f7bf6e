#!/usr/bin/env bash
# The prepared GPU check (DESIGN.md, "A GPU machine, when one is lent"): Ray-free, one GPU.
#
# Here, once:   ../shared/gpu/fetch-wheels.sh .whl        (deepspeed, hydra, ... as wheels; ~5 MB)
# On the device, from the project root, carrying .whl:    bash bench/gpu_check.sh
#
# Sections, in this order, each under `timeout`, each appending one JSON record to
# $OUT/gpu_check.jsonl (and a line to $OUT/summary.txt) as soon as it ends:
#   1b_compiled   OpenELM-1.1B, bf16, seq 2048: tokens/s and MFU, torch.compile   (goal: MFU >= 50%)
#   1b_eager      the same, eager
#   270m_compiled OpenELM-270M, the same, compiled
#   270m_eager    OpenELM-270M, eager
#   270m_ref      OpenELM-270M forward + backward against the plain reference (same weights, batch, bf16)
#   1b_deepspeed  OpenELM-1.1B, eager, on the DeepSpeed ZeRO-0 engine (needs the wheels)
#   1b_deepspeed_compiled  the same, compiled as train.compile=true compiles (needs the wheels)
# The 1.1B sections run without activation checkpointing (MFU counts model FLOPs only, so
# recomputing activations would cost a third more work uncounted), at the largest micro-batch
# that fit an H100 80GB on 2026-11-27: 10 compiled (52.6 GiB peak), 8 eager (69.8 GiB).
# Sections 1-5 use torch's fused AdamW and need nothing beyond the device's torch (2.11).
# A failed or timed-out section is recorded as such and the script goes on; it exits 0.
# Everything it prints also goes to $OUT/gpu_check.log; $OUT/env.txt holds the machine.
#
# Time: the caps below add up to about 9.5 minutes (7 without the last section), plus a few seconds for the wheels.
# Override any cap (T_<section>=seconds) or run only some sections, e.g.
#   SECTIONS="1b_eager 270m_ref" T_1b_eager=90 bash bench/gpu_check.sh
# EXTRA_ARGS is appended to every bench/gpu_step.py command; a dry run of the plumbing on CPU:
#   OUT=/tmp/gc SECTIONS=270m_eager EXTRA_ARGS="--device cpu --seq 32 --steps 1" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
JSONL=$OUT/gpu_check.jsonl
touch "$JSONL"
SUMMARY=$OUT/summary.txt
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-"1b_compiled 1b_eager 270m_compiled 270m_eager 270m_ref 1b_deepspeed 1b_deepspeed_compiled"}
T_1b_compiled=${T_1b_compiled:-150}
T_1b_eager=${T_1b_eager:-50}
T_270m_compiled=${T_270m_compiled:-80}
T_270m_eager=${T_270m_eager:-35}
T_270m_ref=${T_270m_ref:-45}
T_1b_deepspeed=${T_1b_deepspeed:-45}
T_1b_deepspeed_compiled=${T_1b_deepspeed_compiled:-150}
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/elmforge-inductor}  # a rerun on a warm machine reuses it

exec > >(tee -a "$LOG") 2>&1
echo "[gpu_check] $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, results in $OUT"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi 2>&1
    $PY -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1
    nproc
} > "$OUT/env.txt"

# The carried wheels (deepspeed, hydra-core, ...), as fetch-wheels.sh's usage says.
wheels=no
if compgen -G ".whl/*.whl" > /dev/null; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
        wheels=yes
    else
        echo "[gpu_check] installing .whl/*.whl failed; the deepspeed section will be skipped"
    fi
else
    echo "[gpu_check] no .whl/*.whl carried; the deepspeed section will be skipped"
fi
export PYTHONPATH=/tmp/site:$PWD

# run_section NAME SECONDS gpu_step.py-args...: one capped run; a record even when it fails.
run_section() {
    local name=$1 cap=$2
    shift 2
    case " $SECTIONS " in *" $name "*) ;; *) return 0 ;; esac
    echo "[gpu_check] === $name (at most ${cap}s): bench/gpu_step.py $*"
    local before after rc start=$SECONDS
    before=$(wc -l < "$JSONL")
    # gpu_step stops timing steps 20 s before the cap (model build, imports and exit fit in that).
    timeout --kill-after=10 "$cap" $PY bench/gpu_step.py --label "$name" --out "$JSONL" --budget $((cap - 20)) "$@" $EXTRA_ARGS
    rc=$?
    after=$(wc -l < "$JSONL")
    if [ "$after" -le "$before" ]; then  # killed (timeout) or crashed before writing its record
        local why="exit status $rc"
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${cap}s"
        printf '{"label": "%s", "error": "%s", "args": "%s"}\n' "$name" "$why" "$*" >> "$JSONL"
    fi
    $PY - "$JSONL" "$name" $((SECONDS - start)) >> "$SUMMARY" <<'EOF'
import json, sys
path, name, took = sys.argv[1], sys.argv[2], sys.argv[3]
r = [json.loads(line) for line in open(path) if line.strip()][-1]
if r.get("label") != name:
    print(f"{name}: no record ({took}s)")
elif "error" in r:
    print(f"{name}: FAILED in {took}s: {r['error'][:300]}")
else:
    text = f"{name}: {r['model']} {r['precision']} seq {r['seq']} micro-batch {r['micro_batch']}, {r['tokens_per_s']:,.0f} tokens/s"
    if r.get("mfu") is not None:
        text += f", MFU {r['mfu']:.1%}"
    if "speedup" in r:
        text += f", {r['speedup']:.2f}x the plain reference (reference MFU {r['reference_mfu']:.1%})"
    elif "error" in r.get("reference", {}):
        text += f", reference: {r['reference']['error']}"
    if r["model"] == "openelm_1_1b" and r.get("mfu") is not None:
        text += " (goal MFU >= 50%: " + ("met" if r["mfu"] >= 0.5 else "NOT met") + ")"
    print(text + f" [{r['device']}, torch {r['torch']}, {took}s]")
EOF
    tail -n 1 "$SUMMARY"
}

ONE_B=(--model openelm_1_1b --activation-checkpointing off)
run_section 1b_compiled "$T_1b_compiled" "${ONE_B[@]}" --micro-batch 10 --compile --warmup 2
run_section 1b_eager "$T_1b_eager" "${ONE_B[@]}" --micro-batch 8 --warmup 2
run_section 270m_compiled "$T_270m_compiled" --model openelm_270m --compile --warmup 2
run_section 270m_eager "$T_270m_eager" --model openelm_270m --warmup 2
run_section 270m_ref "$T_270m_ref" --model openelm_270m --baseline reference --micro-batch 2 --warmup 1 --steps 5
if [ "$wheels" = yes ]; then
    run_section 1b_deepspeed "$T_1b_deepspeed" "${ONE_B[@]}" --micro-batch 8 --engine deepspeed --warmup 2
    run_section 1b_deepspeed_compiled "$T_1b_deepspeed_compiled" "${ONE_B[@]}" --micro-batch 10 --engine deepspeed \
        --compile --warmup 2
else
    for name in 1b_deepspeed 1b_deepspeed_compiled; do
        [[ " $SECTIONS " == *" $name "* ]] && echo "$name: skipped (no wheels installed)" | tee -a "$SUMMARY"
    done
fi

echo "[gpu_check] done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
cat "$SUMMARY"
exit 0
