"""QAT step time vs float step time (resnet20, batch 128), and PyTorch's LSQ peer, side by side.

    python benchmarks/qat_overhead.py [--device cpu] [--batch 128] [--json OUT.json]

Variants (forward, backward, SGD update on the same data, timed round-robin):
  float      the model with BatchNorm, float32
  lsqint     lsqint.prepare_qat at W4A4 (per-channel weights, first/last 8-bit), BN folded
  torch.ao   prepare_qat_fx with _LearnableFakeQuantize (LSQ + grad scaling), per-tensor weights
"""

import argparse

from lsqint.app.bench import format_rows, qat_overhead, script_result, write_json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--model", default="resnet20")
p.add_argument("--device", default="cpu")
p.add_argument("--batch", type=int, default=128)
p.add_argument("--bits", type=int, nargs=2, default=(4, 4), metavar=("W", "A"))
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--json", default="bench_results/qat_overhead.json")
args = p.parse_args()
rows = qat_overhead(
    args.model, args.device, args.batch, tuple(args.bits), args.rounds, args.repeats
)
print(
    f"{args.model}, batch {args.batch}, {args.device}, W{args.bits[0]}A{args.bits[1]}, "
    f"median of {args.rounds} rounds x {args.repeats} steps"
)
print(format_rows(rows))
write_json(args.json, script_result("qat_overhead", args, rows))
