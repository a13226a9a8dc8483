"""ONNX Runtime speed: the integer-only export vs a float32 ONNX export of the same model, and the
torch integer runtime, side by side.

    python benchmarks/onnx_inference.py [--batch 256] [--json OUT.json]

resnet20 at W4A4 and W8A8, CPU; ratios are to ONNX Runtime float32.
"""

import argparse

from lsqint.bench import format_rows, onnx_inference, script_result, write_json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--model", default="resnet20")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--json", default="bench_results/onnx_inference.json")
args = p.parse_args()
rows = onnx_inference(args.model, args.batch, rounds=args.rounds)
print(f"{args.model}, batch {args.batch}, cpu")
print(format_rows(rows))
write_json(args.json, script_result("onnx_inference", args, rows))
