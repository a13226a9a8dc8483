"""ONNX Runtime speed, side by side in one run: the float32 ONNX export of the same model, ONNX
Runtime's int8 QDQ path (W8A8), lsqint's integer exports (int, int-float, qlinear) and the torch
integer runtime.

    python benchmarks/onnx_inference.py [--batch 256] [--threads 1] [--json OUT.json]
    python benchmarks/onnx_inference.py --programs docs/results/*/*.intprog.safetensors

resnet20 at W4A4 and W8A8 with random weights, or trained programs (--programs), CPU.
"""

import argparse
from pathlib import Path

import torch

from lsqint import load
from lsqint.app.bench import format_rows, onnx_inference, script_result, write_json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--model", default="resnet20")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--programs", nargs="*", default=None, help="trained program files of --model")
p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtimes' default)")
p.add_argument("--json", default="bench_results/onnx_inference.json")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
programs = None
if args.programs:
    programs = {Path(f).name.split(".")[0]: load(f) for f in args.programs}
rows = onnx_inference(
    args.model, args.batch, rounds=args.rounds, programs=programs, threads=args.threads
)
print(f"{args.model}, batch {args.batch}, cpu, threads {args.threads or 'default'}")
print(format_rows(rows))
write_json(args.json, script_result("onnx_inference", args, rows))
