#!/usr/bin/env bash
# Issue 23: MLPerf Tiny's ResNet-8 (`--model mlperf_resnet8`) on CIFAR-10, float then QAT at
# W8A8 / W4A4 / W2A2 with `lsqint sweep`'s defaults (the QAT recipe per bit width, distillation
# from the float model), integer top-1 on the 5,000 `val/` images. Run from the repository root;
# rerun after a stop: the float run resumes from its last.pt, the sweep keeps finished pairs.
# 2-core CPU, one thread beside another training: ~75 s per float epoch, ~150 s per QAT epoch.
set -euo pipefail
OUT=runs/resnet8_sweep
lsqint sweep --model mlperf_resnet8 --dataset cifar10 --data-root ../shared/data/cifar10 --cuda -1 \
    -b 128 -tb 500 --no-progress --workers 1 --float-epochs 60 --pairs "8,8 4,4 2,2" --out $OUT
# What is committed here: the table, plot and JSON, each pair's integer program and metrics,
# and the float model.
HERE=docs/results/cifar10_mlperf_resnet8
RUNS=$OUT/runs/cifar10_mlperf_resnet8
cp $OUT/sweep.json $OUT/sweep.md $OUT/sweep.png $HERE/
cp $RUNS/float/best.pt $HERE/float.pt
cp $RUNS/float/metrics.json $HERE/float_metrics.json
for pair in w8a8 w4a4 w2a2; do
  cp $RUNS/$pair/best.intprog.safetensors $HERE/$pair.intprog.safetensors
  cp $RUNS/$pair/metrics.json $HERE/${pair}_metrics.json
done
