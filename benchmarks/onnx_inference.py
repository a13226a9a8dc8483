"""ONNX Runtime speed: the integer-only export vs a float32 ONNX export of the same model, and the
torch integer runtime, side by side.

    python benchmarks/onnx_inference.py [--batch 256] [--json OUT.json]

resnet20 at W4A4 and W8A8, CPU; ratios are to ONNX Runtime float32.
"""

import argparse
import json
import sys
from pathlib import Path

from lsqint.bench import evidence, format_rows, onnx_inference

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--model", default="resnet20")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--json", default="bench_results/onnx_inference.json")
args = p.parse_args()
rows = onnx_inference(args.model, args.batch, rounds=args.rounds)
print(f"{args.model}, batch {args.batch}, cpu")
print(format_rows(rows))
Path(args.json).parent.mkdir(parents=True, exist_ok=True)
Path(args.json).write_text(
    json.dumps(
        {
            "benchmark": "onnx_inference",
            **vars(args),
            "rows": rows,
            "evidence": evidence(" ".join(sys.argv)),
        },
        indent=2,
    )
)
print(f"wrote {args.json}")
