"""Which torchvision classification families lsqint turns into integer programs.

    python benchmarks/torchvision_coverage.py [--bits 4,4] [--json OUT.json] [--md OUT.md]

Each family at its smallest size, randomly initialized (no download), 10 classes, with
``create_model("torchvision:NAME")`` (torchvision's model behind a Normalize module):
BatchNorm statistics from one batch of 4 random images (see with_batch_statistics) ->
prepare_qat -> calibrate on those images -> convert -> run on every runtime. A row is "exact"
when reference == torch == c (== onnx where onnxruntime is installed) on those images, else the
first line of the error: the op lsqint refused, which is the work left for issue 11. The c
runtime is checked on models up to 5 M parameters (gcc compiles the weights as array text).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lsqint import QuantConfig, prepare_qat
from lsqint.intprog.artifact import program_num_params
from lsqint.models import create_model
from lsqint.qat import calibrate_
from lsqint.qat.convert import convert
from lsqint.runtime import run

FAMILIES = [
    ("resnet", "resnet18", 64),
    ("resnext", "resnext50_32x4d", 64),
    ("wide_resnet", "wide_resnet50_2", 64),
    ("mobilenet_v2", "mobilenet_v2", 64),
    ("mobilenet_v3", "mobilenet_v3_small", 64),
    ("mnasnet", "mnasnet0_5", 64),
    ("shufflenet_v2", "shufflenet_v2_x0_5", 64),
    ("squeezenet", "squeezenet1_1", 64),
    ("densenet", "densenet121", 64),
    ("efficientnet", "efficientnet_b0", 64),
    ("efficientnet_v2", "efficientnet_v2_s", 64),
    ("regnet_x", "regnet_x_400mf", 64),
    ("regnet_y", "regnet_y_400mf", 64),
    ("googlenet", "googlenet", 64),
    ("inception_v3", "inception_v3", 96),
    ("alexnet", "alexnet", 64),
    ("vgg", "vgg11", 64),
    ("vgg_bn", "vgg11_bn", 64),
    # Outside the target: transformers and ConvNeXt (LayerNorm, GELU, attention).
    ("convnext", "convnext_tiny", 64),
    ("swin", "swin_t", 64),
]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--bits", default="4,4", help="W,A")
p.add_argument(
    "--only", default=None, help="comma-separated family names (updates their rows in --json)"
)
p.add_argument("--json", default="bench_results/torchvision_coverage.json")
p.add_argument("--md", default=None, help="also write the table as markdown here")
args = p.parse_args()
w_bits, a_bits = (int(v) for v in args.bits.split(","))
try:
    import onnxruntime  # noqa: F401

    runtimes = ["torch", "c", "onnx"]
except ImportError:
    runtimes = ["torch", "c"]
warnings.filterwarnings("ignore")
C_MAX_PARAMS = 5_000_000


def with_batch_statistics(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Random weights with BatchNorm's default statistics (mean 0, var 1) shrink activations
    layer after layer (a random MobileNetV3's logits are ~1e-10); set every BN's statistics from
    one batch instead, as a trained model's are set from data, so the check sees real codes."""
    for m in model.modules():
        if hasattr(m, "aux_logits"):  # Inception/GoogLeNet: the aux heads only run in training
            m.aux_logits = False  # (and need larger inputs than these)
            for head in ("AuxLogits", "aux1", "aux2"):
                if hasattr(m, head):
                    setattr(m, head, None)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(images.float())
    return model.eval()


def check(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=10)
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    try:
        model = with_batch_statistics(model, images)
    except Exception as err:  # the float model itself cannot run at this size
        return {"status": "float model failed", "reason": str(err).splitlines()[0][:160]}
    try:
        qat = prepare_qat(model, QuantConfig(w_bits, a_bits), images)
    except Exception as err:  # the row reports what was refused
        return {"status": "refused at prepare", "reason": str(err).splitlines()[0][:160]}
    calibrate_(qat, images)
    try:
        program = convert(qat)
    except Exception as err:
        return {"status": "refused at convert", "reason": str(err).splitlines()[0][:160]}
    expected = run(program, images.numpy(), runtime="reference")
    pixels = images.numpy()
    weights = program_num_params(program)
    # The c runtime compiles the weights as C array text: kept to models gcc builds in seconds.
    checked = [rt for rt in runtimes if rt != "c" or weights <= C_MAX_PARAMS]
    differ = [rt for rt in checked if not np.array_equal(run(program, pixels, rt), expected)]
    ops = sorted({n.op for n in program.nodes})
    status = "exact" if not differ else f"DIFFERS: {', '.join(differ)}"
    if len(np.unique(expected)) < 4:  # equal runtimes prove little if the logits are constant
        status += " (degenerate logits)"
    return {
        "status": status,
        "reason": f"ops: {' '.join(ops)}",
        "runtimes": ["reference", *checked],
        "params": weights,
        "nodes": len(program.nodes),
    }


rows = []
wanted = set(args.only.split(",")) if args.only else None
for family, name, size in FAMILIES:
    if wanted and family not in wanted:
        continue
    start = time.perf_counter()
    row = {"family": family, "model": name, "image_size": size, **check(name, size)}
    row["seconds"] = round(time.perf_counter() - start, 1)
    rows.append(row)
    print(f"{family:16} {name:20} {row['status']:20} {row['reason']}", flush=True)

if wanted and Path(args.json).is_file():  # --only: update those rows of an earlier run
    fresh = {r["family"]: r for r in rows}
    earlier = json.loads(Path(args.json).read_text())["rows"]
    rows = [fresh.pop(r["family"], r) for r in earlier] + list(fresh.values())
exact = sum(r["status"] == "exact" for r in rows)
print(f"{exact} of {len(rows)} exact on {', '.join(['reference'] + runtimes)} (W{w_bits}A{a_bits})")
Path(args.json).parent.mkdir(parents=True, exist_ok=True)
result = {"bits": args.bits, "runtimes": runtimes, "rows": rows}
Path(args.json).write_text(json.dumps(result, indent=2))
if args.md:
    lines = [
        "| family | model | px | result | runtimes | ops or refusal |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['family']} | {r['model']} | {r['image_size']} | {r['status']} | "
        f"{' '.join(r.get('runtimes', []))} | {r['reason']} |"
        for r in rows
    ]
    Path(args.md).write_text("\n".join(lines) + "\n")
