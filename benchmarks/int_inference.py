"""Integer-only inference speed: torch integer runtime and reference runtime vs float32 eager.

    python benchmarks/int_inference.py [--device cpu] [--batch 256] [--json OUT.json]

resnet20 at W4A4 and W8A8; images/s on the same uint8 batch, timed round-robin against the float32
eager model (BatchNorm unfolded, eval mode). The reference runtime (numpy int64, the definition)
is timed on 16 images and reported for scale only. On CUDA (or with --int8-gemm) also the torch
runtime with int8 GEMM convolutions (torch._int_mm) and, on CUDA, the float model in float16.
"""

import argparse

from lsqint.app.bench import format_rows, int_inference, script_result, write_json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--model", default="resnet20")
p.add_argument("--device", default="cpu")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--json", default="bench_results/int_inference.json")
p.add_argument("--int8-gemm", action="store_true", default=None, help="default: on CUDA")
args = p.parse_args()
rows = int_inference(
    args.model, args.device, args.batch, rounds=args.rounds, int8_gemm=args.int8_gemm
)
print(f"{args.model}, batch {args.batch}, {args.device}")
print(format_rows(rows))
write_json(args.json, script_result("int_inference", args, rows))
