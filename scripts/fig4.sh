#!/usr/bin/env bash
# The paper's Fig. 4 at mini scale: held-out CE against Whisper tiny.en WER, one point per model — the mini
# teacher, the four shipped hybrids (the attention layers the teacher leans on most, `transfer --placement
# importance`) and a second placement of 1:1 and 1:3 (PLACEMENT, default "front": all attention layers at the
# bottom), distilled here with the shipped recipes (or STEPS phase-3 steps) on the pseudo-labels in WORK.
# `mamtra eval` scores them all on the 120 held-out utterances and draws OUT/eval/ce_vs_wer.png: held-out CE and
# prompted CE (each row's ground truth behind its own prompt, as a request puts it) against WER, each with the
# least-squares line and Pearson r.
#
# Usage: scripts/fig4.sh OUT [STEPS=each ratio's shipped] [PLACEMENT=front] [WORK=/tmp/mamtra-build-hybrids/work]
#   WORK is `mamtra build-hybrids --work`: its pseudo-labels are reused when they were made with the shipped
#   settings, else they are made first (about 7 minutes). Each placement hybrid takes about 20 minutes per
#   600 steps (two side by side on a 2-core CPU); the evaluation about 5 minutes per model. Re-running resumes.
set -euo pipefail
out=${1:?usage: scripts/fig4.sh OUT [STEPS] [PLACEMENT] [WORK]}
steps=${2:-}
placement=${3:-front}
work=${4:-/tmp/mamtra-build-hybrids/work}
mkdir -p "$out"
mamtra build-hybrids --ratios 1:1,1:3 --placement "$placement" ${steps:+--steps "$steps"} --work "$work" \
  --out "$out/$placement" --force
for r in 1-1 1-3; do  # a bundle (LM + the mini codec) is what `mamtra eval --model` speaks with
  mamtra export --model "$work/mini-$r-$placement/kd-prompted" --assets mini --out "$out/mini-$r-$placement.bundle" --force
done
mamtra eval --list mini-heldout --data mini-heldout --out "$out/eval" --threads 1 --baseline mini \
  --model mini --model mini-1-1 --model mini-1-3 --model mini-1-5 --model mini-1-11 \
  --model "mini-1-1-$placement=$out/mini-1-1-$placement.bundle" --model "mini-1-3-$placement=$out/mini-1-3-$placement.bundle"
