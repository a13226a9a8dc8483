#!/usr/bin/env bash
# One prepared run on a CUDA machine: CUDA runtime == reference tests, GPU benchmarks, and a
# CIFAR-10 resnet20 float -> W4A4 QAT -> integer-only run. Writes logs and JSON under $OUT.
# Usage (repo root, CIFAR-10 ImageFolder tree at .data/cifar10):  OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LSQINT_CACHE=/tmp/lsqint-cache
OUT=${OUT:-/tmp/lsqint-gpu}; mkdir -p "$OUT"
FLOAT_EPOCHS=${FLOAT_EPOCHS:-30}; QAT_EPOCHS=${QAT_EPOCHS:-15}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_runtimes.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
timeout 60 python3 benchmarks/int_inference.py --device cuda --json "$OUT/int_inference_cuda.json" 2>&1 | tail -4
timeout 60 python3 benchmarks/qat_overhead.py --device cuda --json "$OUT/qat_overhead_cuda.json" 2>&1 | grep -v Warn | tail -5
C=(--model resnet20 --dataset cifar10 --data-root .data/cifar10 --cuda 0 --amp --no-progress
   --log-dir /tmp/runs -b 128 -tb 500 --workers 8)
timeout 240 python3 -m lsqint train "${C[@]}" -e "$FLOAT_EPOCHS" --lr 0.1 2>&1 | tee "$OUT/cifar_float.log" | tail -4
timeout 150 python3 -m lsqint qat "${C[@]}" -e "$QAT_EPOCHS" --lr 0.01 -w 4 -a 4 2>&1 | tee "$OUT/cifar_w4a4.log" | tail -4
timeout 60 python3 -m lsqint infer "${C[@]}" -w 4 -a 4 --runtime torch --json "$OUT/cifar_w4a4_infer.json" 2>&1 | tee "$OUT/cifar_w4a4_infer.log"
cp /tmp/runs/cifar10_resnet20/float/metrics.json "$OUT/cifar_float_metrics.json" 2>/dev/null
cp /tmp/runs/cifar10_resnet20/w4a4/metrics.json "$OUT/cifar_w4a4_metrics.json" 2>/dev/null
echo done
