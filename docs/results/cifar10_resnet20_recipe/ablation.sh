#!/usr/bin/env bash
# Two W2A2 ablations left open by issue 9's table (2026-11-30, session 8), from the provided float
# checkpoint, run from the repository root (2-core CPU, ~75 minutes):
#  1. distillation alone: the old defaults (lr 0.001, wd 5e-4, no clipping, no 8-bit residual
#     stream) plus KD, 2 epochs from float: the `abl_kd` line of ../cifar10_resnet20_lowbit/run.sh;
#  2. the recipe without the progressive chain: `lsqint qat -w 2 -a 2` with its defaults
#     (15 epochs, lr 0.03, wd 1e-4, clip 1, 8-bit residual stream, KD) straight from float
#     instead of from the W3A3 checkpoint.
set -uo pipefail
FLOAT=../shared/models/cifar10_resnet20_float.pt
COMMON=(--model resnet20 --dataset cifar10 --data-root ../shared/data/cifar10 --cuda -1
        -b 128 -tb 500 --no-progress --workers 1)
HERE=docs/results/cifar10_resnet20_recipe
R=runs/lowbit
lsqint qat "${COMMON[@]}" -w 2 -a 2 -e 2 --lr 0.001 --wd 5e-4 --grad-clip none \
    --residual-bits none --distill --init $FLOAT --log-dir $R/abl_kd
lsqint infer "${COMMON[@]}" -w 2 -a 2 --log-dir $R/abl_kd --json $HERE/ablation_w2a2_kd_only_2ep.json
lsqint qat "${COMMON[@]}" -w 2 -a 2 --init $FLOAT --log-dir $R/s8_direct
lsqint infer "${COMMON[@]}" -w 2 -a 2 --log-dir $R/s8_direct --json $HERE/ablation_w2a2_from_float.json
# 3. as 2 with --seed 1 (how much of the gap to the chain is the seed); added after 1-2 had run.
lsqint qat "${COMMON[@]}" -w 2 -a 2 --init $FLOAT --seed 1 --log-dir $R/s8_direct_seed1
lsqint infer "${COMMON[@]}" -w 2 -a 2 --log-dir $R/s8_direct_seed1 \
    --json $HERE/ablation_w2a2_from_float_seed1.json
