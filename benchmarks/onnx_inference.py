"""ONNX Runtime speed: integer-only export vs a float32 ONNX export of the same model, and the torch
integer runtime, side by side.

    python benchmarks/onnx_inference.py [--batch 256] [--json OUT.json]

resnet20 (random weights, BN statistics randomized, calibrated on random pixels) at W4A4 and W8A8.
Images/s on the same uint8 batch, timed round-robin; ratios are to ONNX Runtime float32.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import evidence, interleaved_timings, write_json  # noqa: E402
from int_inference import randomized  # noqa: E402

import lsqint  # noqa: E402
from lsqint.export.onnx_int import OnnxSession  # noqa: E402
from lsqint.models import create_model  # noqa: E402
from lsqint.qat import calibrate_  # noqa: E402
from lsqint.runtime import CompiledProgram  # noqa: E402


def float_session(model: torch.nn.Module, images: torch.Tensor) -> ort.InferenceSession:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (images.float(),),
        buf,
        input_names=["input"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="bench_results/onnx_inference.json")
    args = p.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    images_np = images.numpy()
    float_model = randomized(create_model(args.model))
    fsess = float_session(float_model, images)
    images_f = images_np.astype(np.float32)
    rows = []
    print(f"{args.model}, batch {args.batch}, cpu, ONNX Runtime {ort.__version__}")
    print(
        f"{'bits':<6} {'ort-float32':>12} {'ort-int':>9} {'ratio':>7} "
        f"{'torch-int':>10} {'ratio':>7}"
    )
    for bits in (4, 8):
        qat = lsqint.prepare_qat(
            randomized(create_model(args.model)),
            lsqint.QuantConfig(weight_bits=bits, act_bits=bits),
            images,
        )
        calibrate_(qat, images[:64])
        program = lsqint.convert(qat)
        isess = OnnxSession(program)
        compiled = CompiledProgram(program)
        assert np.array_equal(isess(images_np[:8]), compiled(images_np[:8]))
        fns = {
            "ort-float32": lambda: fsess.run(["logits"], {"input": images_f}),
            "ort-int": lambda isess=isess: isess(images_np),
            "torch-int": lambda compiled=compiled: compiled(images_np),
        }
        for fn in fns.values():
            fn()
        times = interleaved_timings(fns, args.rounds, 1)
        ips = {k: args.batch / v for k, v in times.items()}
        base = ips["ort-float32"]
        rows.append(
            {
                "bits": f"W{bits}A{bits}",
                **{f"{k}_images_per_s": v for k, v in ips.items()},
                "ort_int_ratio": ips["ort-int"] / base,
                "torch_int_ratio": ips["torch-int"] / base,
            }
        )
        print(
            f"W{bits}A{bits:<4} {base:>12.0f} {ips['ort-int']:>9.0f} "
            f"{ips['ort-int'] / base:>6.2f}x "
            f"{ips['torch-int']:>10.0f} {ips['torch-int'] / base:>6.2f}x"
        )
    write_json(
        args.json,
        {
            "benchmark": "onnx_inference",
            "model": args.model,
            "batch": args.batch,
            "rows": rows,
            "evidence": evidence(),
        },
    )


if __name__ == "__main__":
    main()
