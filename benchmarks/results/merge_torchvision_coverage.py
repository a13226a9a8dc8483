"""Merge the two coverage runs of 2026-11-29 into
benchmarks/results/torchvision_coverage.{json,md}."""

import json
import sys
from pathlib import Path

import torch

from lsqint.models import create_model

ORDER = (
    "resnet resnext wide_resnet mobilenet_v2 mobilenet_v3 mnasnet shufflenet_v2 squeezenet "
    "densenet efficientnet efficientnet_v2 regnet_x regnet_y googlenet inception_v3 alexnet vgg "
    "vgg_bn convnext swin"
).split()
rows = {}
for line in Path("benchmarks/results/torchvision_coverage_run1.log").read_text().splitlines():
    parts = line.split()
    family, model, status = parts[0], parts[1], parts[2]
    if status != "exact":
        continue  # measured again in run 2 with the fixes
    m = create_model(f"torchvision:{model}", num_classes=10)
    params = sum(
        x.weight.numel() for x in m.modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))
    )
    runtimes = ["reference", "torch"] + (["c"] if params <= 5_000_000 else []) + ["onnx"]
    rows[family] = {
        "family": family,
        "model": model,
        "image_size": 64,
        "status": status,
        "reason": " ".join(parts[3:]),
        "runtimes": runtimes,
        "params": params,
        "run": 1,
    }
for path in sys.argv[1:]:
    for r in json.loads(Path(path).read_text())["rows"]:
        r["run"] = 2
        rows[r["family"]] = r
out = [rows[f] for f in ORDER if f in rows]
Path("benchmarks/results/torchvision_coverage.json").write_text(
    json.dumps({"bits": "4,4", "rows": out}, indent=2)
)
lines = [
    "| family | model | px | result | runtimes `==` | ops, or what was refused |",
    "|---|---|---|---|---|---|",
]
for r in out:
    runtimes = " ".join(r.get("runtimes", []))
    lines.append(
        f"| {r['family']} | {r['model']} | {r['image_size']} | {r['status']} | {runtimes} "
        f"| {r['reason']} |"
    )
Path("benchmarks/results/torchvision_coverage.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
