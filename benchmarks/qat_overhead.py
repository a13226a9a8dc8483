"""QAT step time vs float step time on resnet20 (batch 128), and PyTorch's LSQ peer, side by side.

    python benchmarks/qat_overhead.py [--device cpu] [--batch 128] [--json OUT.json]

Three training steps (forward, backward, SGD update) on the same data, timed round-robin:
  float      resnet20 with BatchNorm, float32
  lsqint     lsqint.prepare_qat at W4A4 (per-channel weights, first/last 8-bit), BN folded
  torch.ao   prepare_qat_fx with _LearnableFakeQuantize (LSQ, grad scaling) at W4A4, per-tensor
             weights (its per-channel learnable path needs extra care), BN kept as torch.ao does
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import evidence, interleaved_timings, write_json  # noqa: E402

import lsqint  # noqa: E402
from lsqint.models import create_model  # noqa: E402
from lsqint.qat import calibrate_  # noqa: E402


def torch_ao_lsq(model: nn.Module, example: torch.Tensor, w_bits: int, a_bits: int) -> nn.Module:
    from torch.ao.quantization import QConfig, QConfigMapping, disable_observer
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    act = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=2**a_bits - 1,
        dtype=torch.quint8,
        use_grad_scaling=True,
    )
    weight = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=-(2 ** (w_bits - 1)),
        quant_max=2 ** (w_bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
        use_grad_scaling=True,
    )
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    model.train()
    prepared = prepare_qat_fx(model, mapping, (example.float(),))
    prepared(example.float())  # observers set the initial scales once, like LSQ's calibration
    prepared.apply(disable_observer)
    return prepared


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bits", type=int, nargs=2, default=(4, 4), metavar=("W", "A"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="bench_results/qat_overhead.json")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    w_bits, a_bits = args.bits

    float_model = create_model("resnet20").to(device)
    qat = lsqint.prepare_qat(
        create_model("resnet20").eval(),
        lsqint.QuantConfig(weight_bits=w_bits, act_bits=a_bits),
        images.cpu(),
    ).to(device)
    calibrate_(qat, images)
    steps = {
        "float": make_step(float_model, images.float(), labels),
        "lsqint": make_step(qat, images, labels),
    }
    try:
        peer = torch_ao_lsq(create_model("resnet20").to(device), images, w_bits, a_bits)
        steps["torch.ao"] = make_step(peer, images.float(), labels)
    except Exception as err:  # report, don't hide: the table says why the peer is missing
        print(f"torch.ao peer unavailable: {type(err).__name__}: {err}")
    for fn in steps.values():  # warm up allocators and kernels
        fn()
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved_timings(steps, args.rounds, args.repeats, sync)
    base = times["float"]
    print(
        f"resnet20, batch {args.batch}, {device}, W{w_bits}A{a_bits}, "
        f"median of {args.rounds} rounds x {args.repeats} steps"
    )
    print(f"{'variant':<10} {'ms/step':>9} {'vs float':>9}")
    rows = []
    for name, t in times.items():
        print(f"{name:<10} {1000 * t:>9.1f} {t / base:>8.3f}x")
        rows.append({"variant": name, "ms_per_step": 1000 * t, "ratio_to_float": t / base})
    write_json(
        args.json,
        {
            "benchmark": "qat_overhead",
            "model": "resnet20",
            "batch": args.batch,
            "device": str(device),
            "bits": [w_bits, a_bits],
            "rows": rows,
            "evidence": evidence(),
        },
    )


if __name__ == "__main__":
    main()
