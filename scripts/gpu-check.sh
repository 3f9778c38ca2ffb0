#!/usr/bin/env bash
# GPU check of issue 16 ("decode at the speed of the hardware"), in one run of under 5 minutes:
#   1. environment: torch, the GPU, which optional kernels import (mamba-ssm, causal-conv1d)  -> env.json
#   2. the GPU-marked tests of tests/models (kernel parity, CUDA-graph replay = eager step, no host sync)
#      -> pytest-gpu.xml; with the kernels installed, again on the pure path (MAMTRA_KERNELS=0)
#   3. decode ms/step at CosyVoice 2 sizes (teacher, 1:1 and 1:5 hybrids, bf16, batch 1 and 16, a real
#      512-token prefill): dynamic-cache step, static-cache step, static step replayed as a CUDA graph
#                                                                                    -> decode.json, decode.png
#   4. `mamtra profile speed --decode graph` (teacher, 1:1, 1:5; batch 1,16,64; contexts 512,4096)
#                                                                                    -> speed.{json,csv,png}
#      and the same with `--decode dynamic`                                         -> dynamic/speed.{json,csv,png}
#      then decode_modes.json: per model, batch and context, graph vs dynamic ms/step, each hybrid's decode
#      speed-up over the teacher in graph mode, and the teacher's fraction of the bandwidth floor
#   5. `mamtra profile vram --gpu h200` (teacher, 1:1, 1:3; 256/1024 tokens; batch 1,16) -> vram.{json,csv,png}
#   6. with the kernels installed, steps 2 and 3 again on the pure path (MAMTRA_KERNELS=0), if time is left
# and summary.json (every step's exit code and seconds). Works with or without mamba-ssm: the pure-PyTorch
# path is the default, the kernels are used where they import (the fused Mamba decode step among them).
#
# Usage: scripts/gpu-check.sh OUT_DIR
# Environment: PYTHON (default python3), GPU_CHECK_DEVICE (default cuda; `cpu` smoke-tests this script),
#   GPU_CHECK_ARCH (default cosyvoice2-0.5b; an arch name or YAML path), GPU_CHECK_GPU (default h200),
#   GPU_CHECK_BUDGET_S (default 290: steps are cut short so that the whole run ends within it).
# Through the project's device tool, which returns at most 8 files, pack the folder:
#   scripts/gpu-check.sh /tmp/gc; rc=$?; tar czf "$OUT/gpu-check.tgz" -C /tmp gc; exit $rc
# Exit status: 0 if every step passed, 1 otherwise (the other steps still run).

set -u -o pipefail

DIR=${1:?usage: scripts/gpu-check.sh OUT_DIR}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
ARCH=${GPU_CHECK_ARCH:-cosyvoice2-0.5b}
GPU=${GPU_CHECK_GPU:-h200}
BUDGET=${GPU_CHECK_BUDGET_S:-290}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
T0=$(date +%s)
FAILED=0
: > "$DIR/steps.tsv"

# step NAME LIMIT_S CMD...: run CMD with its output in NAME.log, within LIMIT_S and the overall budget.
step() {
    local name=$1 limit=$2 left rc t
    shift 2
    left=$(( BUDGET - ($(date +%s) - T0) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$DIR/steps.tsv"
        FAILED=1
        return
    fi
    echo "== $name (at most ${limit}s)"
    t=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$DIR/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$DIR/steps.tsv"
    tail -n 3 "$DIR/$name.log"
    (( rc == 0 )) || FAILED=1
}

# 1. environment
step env 60 "$PY" - "$DIR/env.json" "$DEVICE" <<'EOF'
import json, platform, sys
import torch
from mamtra_cli.models.kernels import kernel_report
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": sys.argv[2], "kernels": kernel_report()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
elif sys.argv[2] == "cuda":
    raise SystemExit("no CUDA device visible to torch")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
HAVE_KERNELS=$("$PY" -c "from mamtra_cli.models import kernels; print(int(kernels.HAVE_MAMBA_KERNELS))" 2>/dev/null || echo 0)

# The `mamtra` CLI finds its stages through entry points: register this checkout if it is not installed.
if ! "$PY" -c "from importlib.metadata import entry_points as e; import sys; sys.exit(not any(x.name == 'profile.speed' for x in e(group='mamtra.stages')))" 2>/dev/null; then
    step install 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

# 2. GPU-marked tests (CPU-only tests are CI's job)
step pytest-gpu 100 "$PY" -m pytest tests/models -m gpu -q -rs -p no:cacheprovider --junitxml "$DIR/pytest-gpu.xml"

# 3. decode step: dynamic vs static vs CUDA graph
DECODE_PY=$(cat <<'EOF'
import json, sys
import torch
from mamtra_cli import profiling as P
from mamtra_cli.models.bench_decode import bench_decode
from mamtra_cli.models.kernels import kernel_report

out, device, arch = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
variants = ("dynamic", "static", "graph") if device == "cuda" else ("dynamic", "static")
batches, prompt = ((1, 16), 512) if device == "cuda" else ((1, 4), 200)
rows = []
for spec in P.resolve_specs(None, arch, "1:1,1:5"):
    model = spec.build(dtype, device)
    for batch in batches:
        r = bench_decode(model, batch=batch, prompt=prompt, steps=48, warmup=8, variants=variants)
        row = {"model": spec.name, "layout": spec.layout, "batch": batch, "prompt": prompt,
               **{f"{k}_ms": v * 1e3 for k, v in r.items()}}
        row.update({f"{k}_speedup": r["dynamic"] / v for k, v in r.items() if k != "dynamic"})
        rows.append(row)
        print(json.dumps(row), flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
json.dump({"device": device, "dtype": str(dtype), "kernels": kernel_report(), "rows": rows},
          open(out + ".json", "w"), indent=1)
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(7, 4))
labels = [f"{r['model']} b{r['batch']}" for r in rows]
width = 0.8 / len(variants)
for i, v in enumerate(variants):
    ax.bar([j + i * width for j in range(len(rows))], [r[f"{v}_ms"] for r in rows], width, label=v)
ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(rows))], labels)
ax.set_ylabel("ms per decode step")
ax.set_title(f"decode step, {device}, {dtype}, context {prompt}")
ax.legend()
fig.tight_layout()
fig.savefig(out + ".png", dpi=120)
EOF
)
step decode 60 "$PY" -c "$DECODE_PY" "$DIR/decode" "$DEVICE" "$ARCH"

# 4. and 5. the profiles, as a user runs them: decode timed as a CUDA graph (the default on CUDA) and on the
# dynamic cache (the reference), teacher and hybrids at the issue's batches and contexts
DT=bf16; [[ $DEVICE == cpu ]] && DT=fp32
FAST=graph; SPEED_BATCH=1,16,64; SPEED_CTX=512,4096
[[ $DEVICE == cpu ]] && { FAST=static; SPEED_BATCH=1,4; SPEED_CTX=256,1024; }
step profile-speed 90 "$PY" -m mamtra_cli profile speed --arch "$ARCH" --ratio 1:1,1:5 --batch "$SPEED_BATCH" \
    --contexts "$SPEED_CTX" --decode-steps 16 --repeats 2 --dtype "$DT" --device "$DEVICE" --decode "$FAST" \
    --out "$DIR" --force
step profile-speed-dynamic 70 "$PY" -m mamtra_cli profile speed --arch "$ARCH" --ratio 1:1,1:5 \
    --batch "$SPEED_BATCH" --contexts "$SPEED_CTX" --decode-steps 16 --repeats 2 --dtype "$DT" --device "$DEVICE" \
    --decode dynamic --out "$DIR/dynamic" --force
step decode-modes 20 "$PY" - "$DIR" <<'EOF'
import json, os, sys
d = sys.argv[1]
fast = json.load(open(f"{d}/speed.json"))
slow = json.load(open(f"{d}/dynamic/speed.json")) if os.path.exists(f"{d}/dynamic/speed.json") else {"rows": []}
dyn = {(r["model"], r["batch"], r["context"]): r for r in slow["rows"]}
rows = []
for r in fast["rows"]:
    o = dyn.get((r["model"], r["batch"], r["context"]))
    rows.append({"model": r["model"], "layout": r["layout"], "batch": r["batch"], "context": r["context"],
                 f"{fast['decode']}_ms": r["decode_ms_per_step"], "dynamic_ms": o and o["decode_ms_per_step"],
                 "speedup_vs_dynamic": o and o["decode_ms_per_step"] / r["decode_ms_per_step"],
                 "decode_speedup_vs_teacher": r["decode_speedup_vs_first"],
                 "fraction_of_floor": r["fraction_of_floor"], "floor_ms": r["floor_ms_per_step"]})
out = {"mode": fast["decode"], "device": fast["device"], "dtype": fast["dtype"], "rows": rows,
       "teacher_batch1_fraction_of_floor": {r["context"]: r["fraction_of_floor"] for r in rows
                                            if r["model"] == "teacher" and r["batch"] == 1},
       "min_hybrid_speedup_vs_teacher": min((r["decode_speedup_vs_teacher"] for r in rows
                                             if r["model"] != "teacher"), default=None)}
json.dump(out, open(f"{d}/decode_modes.json", "w"), indent=1)
for r in rows:
    print("\t".join(str(round(v, 3) if isinstance(v, float) else v) for v in r.values()))
print(json.dumps({k: out[k] for k in ("teacher_batch1_fraction_of_floor", "min_hybrid_speedup_vs_teacher")}))
EOF
step profile-vram 60 "$PY" -m mamtra_cli profile vram --gpu "$GPU" --arch "$ARCH" --ratio 1:1,1:3 \
    --lengths 256,1024 --batch 1,16 --dtype "$DT" --device "$DEVICE" --out "$DIR" --force

# 6. the pure path on the GPU, when the kernels made the runs above take the kernel path
if [[ $HAVE_KERNELS == 1 ]]; then
    MAMTRA_KERNELS=0 step pytest-gpu-pure 60 "$PY" -m pytest tests/models -m gpu -q -rs -p no:cacheprovider \
        --junitxml "$DIR/pytest-gpu-pure.xml"
    MAMTRA_KERNELS=0 step decode-pure 45 "$PY" -c "$DECODE_PY" "$DIR/decode-pure" "$DEVICE" "$ARCH"
fi

"$PY" - "$DIR" "$FAILED" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
d, failed, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
steps = [dict(zip(("step", "rc", "seconds"), line.rstrip("\n").split("\t"))) for line in open(f"{d}/steps.tsv")]
json.dump({"passed": not failed, "seconds": total, "steps": steps}, open(f"{d}/summary.json", "w"), indent=1)
print(json.dumps({"passed": not failed, "seconds": total}))
EOF
exit "$FAILED"
