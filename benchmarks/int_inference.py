"""Integer-only inference speed: torch integer runtime vs reference runtime vs float32 eager.

    python benchmarks/int_inference.py [--device cpu] [--batch 256] [--json OUT.json]

resnet20 (random weights, BN statistics randomized, calibrated on random pixels) at W4A4 and W8A8,
converted to an IntProgram; images/s of each runtime on the same uint8 batch, timed round-robin,
with the float32 eager model (BatchNorm unfolded, eval mode) as the baseline. The reference runtime
is numpy int64 written for clarity: it is timed on fewer images and reported for scale only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import evidence, interleaved_timings, write_json  # noqa: E402

import lsqint  # noqa: E402
from lsqint.models import create_model  # noqa: E402
from lsqint.qat import calibrate_  # noqa: E402
from lsqint.runtime import CompiledProgram, run_reference  # noqa: E402


def randomized(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reference-images", type=int, default=16)
    p.add_argument("--json", default="bench_results/int_inference.json")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    float_model = randomized(create_model(args.model)).to(device)
    images_dev = images.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    print(f"{args.model}, batch {args.batch}, {device}")
    print(
        f"{'bits':<6} {'float32 img/s':>14} {'torch-int img/s':>16} {'ratio':>7} "
        f"{'reference img/s':>16} {'ratio':>7}"
    )
    for bits in (4, 8):
        qat = lsqint.prepare_qat(
            randomized(create_model(args.model)),
            lsqint.QuantConfig(weight_bits=bits, act_bits=bits),
            images,
        )
        calibrate_(qat, images[:64])
        program = lsqint.convert(qat)
        compiled = CompiledProgram(program, device)

        def float_run():
            with torch.no_grad():
                float_model(images_dev)

        def int_run(compiled=compiled):
            compiled(images_dev)

        for fn in (float_run, int_run):
            fn()
        times = interleaved_timings(
            {"float32": float_run, "torch-int": int_run}, args.rounds, 1, sync
        )
        ref_images = images[: args.reference_images].numpy()
        start = time.perf_counter()
        run_reference(program, ref_images)
        ref_s = (time.perf_counter() - start) / len(ref_images)
        assert np.array_equal(compiled(ref_images), run_reference(program, ref_images))
        float_ips = args.batch / times["float32"]
        int_ips = args.batch / times["torch-int"]
        ref_ips = 1 / ref_s
        rows.append(
            {
                "bits": f"W{bits}A{bits}",
                "float32_images_per_s": float_ips,
                "torch_int_images_per_s": int_ips,
                "torch_int_ratio": int_ips / float_ips,
                "reference_images_per_s": ref_ips,
                "reference_ratio": ref_ips / float_ips,
            }
        )
        print(
            f"W{bits}A{bits:<4} {float_ips:>14.0f} {int_ips:>16.0f} {int_ips / float_ips:>6.2f}x "
            f"{ref_ips:>16.1f} {ref_ips / float_ips:>6.3f}x"
        )
    write_json(
        args.json,
        {
            "benchmark": "int_inference",
            "model": args.model,
            "batch": args.batch,
            "device": str(device),
            "rows": rows,
            "evidence": evidence(),
        },
    )


if __name__ == "__main__":
    main()
