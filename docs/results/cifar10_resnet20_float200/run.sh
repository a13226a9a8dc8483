#!/usr/bin/env bash
# Issue 25: the 200-epoch float resnet20 (lsqint train's defaults) and the QAT sweep from it.
# Run from the repository root; rerun after any stop: the float run resumes exactly from its
# last.pt (restored from resume/ in a fresh checkout) and the sweep keeps the pairs it finished.
set -euo pipefail
DATA=../shared/data/cifar10
RUN=runs/float200/cifar10_resnet20/float
SAVED=docs/results/cifar10_resnet20_float200/resume/last.pt
if [ ! -f "$RUN/last.pt" ] && [ -f "$SAVED" ]; then
    mkdir -p "$RUN" && cp "$SAVED" "$RUN/last.pt"
fi
resume=()
[ -f "$RUN/last.pt" ] && resume=(--resume)
lsqint train --model resnet20 --dataset cifar10 --data-root "$DATA" --cuda -1 -b 128 -tb 500 \
    -e 200 --lr 0.1 --log-dir runs/float200 --no-progress "${resume[@]}"
lsqint sweep --model resnet20 --dataset cifar10 --data-root "$DATA" --cuda -1 -b 128 -tb 500 \
    --no-progress --workers 1 --float-init "$RUN/best.pt" --out runs/float200_sweep
