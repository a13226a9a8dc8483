#!/usr/bin/env bash
# CIFAR-10 resnet20 low-bit runs of issue 9 (CPU, 2 cores), from the provided float checkpoint.
# Run from the repository root; run folders go to runs/lowbit/ (not committed).
set -uo pipefail  # a failed run must not stop the ones after it
FLOAT=../shared/models/cifar10_resnet20_float.pt
COMMON=(--model resnet20 --dataset cifar10 --data-root ../shared/data/cifar10 --cuda -1
        -b 128 -tb 500 --no-progress --workers 1)
R=runs/lowbit
qat() { lsqint qat "${COMMON[@]}" "$@"; }

# Ablation at W2A2 (2 epochs each): the fix alone, then + distillation.
[ -f $R/abl_fix/cifar10_resnet20/w2a2/metrics.json ] || qat -w 2 -a 2 -e 2 --init $FLOAT --log-dir $R/abl_fix
[ -f $R/abl_kd/cifar10_resnet20/w2a2/metrics.json ] || qat -w 2 -a 2 -e 2 --init $FLOAT --distill --log-dir $R/abl_kd

# Recipe: distillation from the float model, progressive 32 -> 4 -> 3 -> 2 bits.
qat -w 4 -a 4 -e 3 --init $FLOAT --distill --log-dir $R/recipe
qat -w 3 -a 3 -e 3 --init $R/recipe/cifar10_resnet20/w4a4/best.pt --distill --teacher $FLOAT --log-dir $R/recipe
qat -w 2 -a 2 -e 5 --init $R/recipe/cifar10_resnet20/w3a3/best.pt --distill --teacher $FLOAT --log-dir $R/recipe
qat -w 8 -a 8 -e 1 --init $FLOAT --distill --log-dir $R/recipe
