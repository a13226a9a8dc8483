"""Evaluate the low-bit runs of run.sh on CIFAR-10 val/ (5,000 images): float, fake-quant and
integer top-1, label agreement, artifact size; writes results.json, results.md, results.png and
copies each integer program here. Run from the repository root:

    python docs/results/cifar10_resnet20_lowbit/evaluate.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from lsqint.app.evaluation import float_accuracy, images_and_labels
from lsqint.app.sweep import _evaluate, plot
from lsqint.data import load_data

HERE = Path(__file__).parent
FLOAT = "../shared/models/cifar10_resnet20_float.pt"
RUNS = Path("runs/lowbit")
# (label, run folder, what the run is)
CANDIDATES = [
    ("W2A2 fix", RUNS / "abl_fix/cifar10_resnet20/w2a2", "MSE step init, from float, 2 epochs"),
    ("W2A2 fix+KD", RUNS / "abl_kd/cifar10_resnet20/w2a2", "+ distillation, 2 epochs"),
    ("W8A8", RUNS / "recipe/cifar10_resnet20/w8a8", "recipe: KD, from float"),
    ("W4A4", RUNS / "recipe/cifar10_resnet20/w4a4", "recipe: KD, from float"),
    ("W3A3", RUNS / "recipe/cifar10_resnet20/w3a3", "recipe: KD, from W4A4"),
    ("W2A2", RUNS / "recipe/cifar10_resnet20/w2a2", "recipe: KD, from W3A3"),
    ("W2A2 long", RUNS / "long/cifar10_resnet20/w2a2", "KD, from W3A3, wd 1e-4"),
    ("W3A3 long", RUNS / "long/cifar10_resnet20/w3a3", "KD, from W4A4, wd 5e-5, 6 of 8 epochs"),
    (
        "W2A2 long BN-aware",
        RUNS / "bnaware/cifar10_resnet20/w2a2",
        "KD, from W3A3, wd 1e-4, BN-aware 8 of 12 epochs, stopped after 3",
    ),
    (
        "W2A2 clip",
        RUNS / "clip/cifar10_resnet20/w2a2",
        "KD, from W3A3 long, lr 0.03, grad-clip 1, residual-bits 8, wd 1e-4",
    ),
    (
        "W3A3 clip",
        RUNS / "clip/cifar10_resnet20/w3a3",
        "KD, from W4A4, lr 0.03, grad-clip 1, residual-bits 8, wd 5e-5",
    ),
    # Session 5: the progressive chain float -> 4 -> 3 -> 2 bits, every step with the fix.
    (
        "W4A4 chain",
        RUNS / "chain/cifar10_resnet20/w4a4",
        "KD, from float, lr 0.01, grad-clip 1, residual-bits 8, wd 5e-5",
    ),
    (
        "W3A3 chain",
        RUNS / "chain/cifar10_resnet20/w3a3",
        "KD, from W4A4 chain, lr 0.03, grad-clip 1, residual-bits 8, wd 5e-5",
    ),
    ("W8A8 clip", RUNS / "chain/cifar10_resnet20/w8a8", "KD, from float, lr 0.01, grad-clip 1"),
    (
        "W3A3 chain lowlr",
        RUNS / "chain01/cifar10_resnet20/w3a3",
        "KD, from W4A4 chain, lr 0.01, grad-clip 1, residual-bits 8, wd 5e-5",
    ),
    # Session 6: longer steps of the chain: W3A3 6 epochs from the W4A4 chain, W2A2 10 from it.
    (
        "W3A3 chain 6ep",
        RUNS / "s6/cifar10_resnet20/w3a3",
        "KD, from W4A4 chain, lr 0.03, grad-clip 1, residual-bits 8, wd 5e-5",
    ),
    (
        "W2A2 chain 10ep",
        RUNS / "s6/cifar10_resnet20/w2a2",
        "KD, from W3A3 chain 6ep, lr 0.03, grad-clip 1, residual-bits 8, wd 1e-4",
    ),
    ("W8A8 2ep", RUNS / "s6/cifar10_resnet20/w8a8", "KD, from float, lr 0.001"),
]


def markdown_table(rows, images: int) -> str:
    lines = [
        f"resnet20 on cifar10 ({images} val images); top-1 in %",
        "",
        "| run | epochs | float | fake-quant | integer | int - float | agreement (f64 / f32) "
        "| artifact | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} ({r['what']}) | {r['epochs']} | {100 * r['float_acc']:.2f} | "
            f"{100 * r['fakequant_acc']:.2f} | {100 * r['int_acc']:.2f} | "
            f"{100 * (r['int_acc'] - r['float_acc']):+.2f} | {100 * r['agreement']:.2f} / "
            f"{100 * r['agreement_f32']:.2f} | {r['artifact_bytes'] / 1024:.0f} KiB | "
            f"{', '.join(f'{t:.0f}' for t in r['s_per_epoch'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    data = load_data("cifar10", "../shared/data/cifar10")
    images, labels = images_and_labels(data.val)
    float_acc = float_accuracy(FLOAT, images, labels)
    # Rows measured earlier for the same run and epoch count are kept, not measured again.
    earlier_path = HERE / "results.json"
    earlier = json.loads(earlier_path.read_text())["rows"] if earlier_path.is_file() else []
    done = {(r["run"], r["epochs"]): r for r in earlier}
    rows = []
    for label, folder, what in CANDIDATES:
        if not (folder / "best.pt").is_file():
            print(f"{label}: no run at {folder}, skipped", file=sys.stderr)
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        w, a = (int(c) for c in folder.name[1:].split("a"))
        if (str(folder), len(metrics["epochs"])) in done:
            rows.append(done[(str(folder), len(metrics["epochs"]))])
            continue
        row = {"pair": label, "w_bits": w, "a_bits": a, "run": str(folder), "what": what}
        row.update(_evaluate(folder / "best.pt", folder / "best.intprog.safetensors", images,
                             labels, "torch", float_acc))  # fmt: skip
        row["epochs"] = len(metrics["epochs"])
        row["s_per_epoch"] = [round(e["time_s"], 1) for e in metrics["epochs"]]
        rows.append(row)
        name = label.lower().replace(" ", "_").replace("+", "_")
        shutil.copy(folder / "best.intprog.safetensors", HERE / f"{name}.intprog.safetensors")
        print(json.dumps(row), flush=True)
    (HERE / "results.json").write_text(json.dumps({"float_acc": float_acc, "rows": rows}, indent=2))
    table = markdown_table(rows, len(labels))
    (HERE / "results.md").write_text(table)
    plot(rows, HERE / "results.png", "resnet20 on cifar10 (short CPU schedules)")
    print(table)


if __name__ == "__main__":
    main()
