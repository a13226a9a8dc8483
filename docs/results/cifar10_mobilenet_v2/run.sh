#!/usr/bin/env bash
# torchvision's mobilenet_v2, unchanged (`--model torchvision:mobilenet_v2`), on CIFAR-10 from the
# command line (issue 11): float training, then W8A8 and W4A4 QAT with the default recipe
# (distillation from the float run, see docs/guide.md), then integer-only evaluation on
# val/ (5,000 images). Run from the repository root; runs go to runs/mobilenet/ (not committed).
set -euo pipefail
D=(--model torchvision:mobilenet_v2 --dataset cifar10 --data-root ../shared/data/cifar10 --cuda -1
   -b 128 -tb 500 --no-progress --workers 1 --log-dir runs/mobilenet)
R=runs/mobilenet/cifar10_torchvision-mobilenet_v2
OUT=docs/results/cifar10_mobilenet_v2
# 20 epochs: what a 2-core CPU session affords (torchvision's recipe is 300 epochs on ImageNet).
[ -f $R/float/best.pt ] || lsqint train "${D[@]}" -e 20
[ -f $R/w8a8/best.pt ] || lsqint qat "${D[@]}" -w 8 -a 8
[ -f $R/w4a4/best.pt ] || lsqint qat "${D[@]}" -w 4 -a 4
for bits in 8 4; do
  lsqint infer "${D[@]}" -w $bits -a $bits --json $OUT/w${bits}a${bits}_infer.json
  cp $R/w${bits}a${bits}/best.intprog.safetensors $OUT/w${bits}a${bits}.intprog.safetensors
  cp $R/w${bits}a${bits}/metrics.json $OUT/w${bits}a${bits}_metrics.json
done
cp $R/float/metrics.json $OUT/float_metrics.json
