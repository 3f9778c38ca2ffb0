#!/usr/bin/env bash
# The paper's Fig. 6 at mini scale: how fast a 1:1 hybrid of the built-in mini voice converges when its Mamba
# layers start from the attention weights (reused: C←Q, B←K, x←V, out←O) or from xavier / kaiming init.
# Each is distilled with the shipped hybrids' recipe (`mamtra build-hybrids`: Mamba layers only, lr 6e-3,
# 4096-token steps as 4 × 1024) for STEPS steps on the same data, then `mamtra plot-runs` overlays train KL
# and validation CE against the step (OUT/fig6.png) and prints first/last numbers.
#
# Usage: scripts/fig6-init.sh OUT [STEPS=150] [DATA=pseudo-labelled manifest] [VAL=manifest]
#   DATA and VAL default to the pseudo-labels of `mamtra build-hybrids` in its default --work
#   (/tmp/mamtra-build-hybrids/work/pl-train and pl-val); the 400 shipped real utterances are always added.
# About 4 minutes per 100 steps per run on one core of a 2-core CPU; the runs go one after another.
set -euo pipefail
out=${1:?usage: scripts/fig6-init.sh OUT [STEPS] [DATA] [VAL]}
steps=${2:-150}
work=/tmp/mamtra-build-hybrids/work
data=${3:-$work/pl-train/data.jsonl}
val=${4:-$work/pl-val/data.jsonl}
real=$(python -c "from mamtra_cli.mini import BUILTIN_DIR; print(BUILTIN_DIR / 'demo_distill.jsonl')")
for f in "$data" "$val"; do
  [ -f "$f" ] || { echo "fig6-init.sh: $f does not exist; run mamtra build-hybrids first or pass DATA and VAL" >&2; exit 2; }
done
mkdir -p "$out"
export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483648 MALLOC_TOP_PAD_=268435456
one() {
  mamtra transfer --teacher mini --ratio 1:1 --init "$1" --out "$out/init-$1" --threads 1 --force
  mamtra distill --teacher mini --student "$out/init-$1" --data "$real" --data "$data" --val "$val" \
    --out "$out/kd-$1" --stages "mamba:$steps:6e-3" --warmup 30 --batch-tokens 1024 --grad-accum 4 \
    --eval-every 25 --save-every 0 --select last --threads 1 --force
}
for init in reused xavier kaiming; do one $init; done
mamtra plot-runs "$out/kd-reused" "$out/kd-xavier" "$out/kd-kaiming" --labels reused,xavier,kaiming \
  --out "$out/fig6.png" --force
