"""`lsqint demo`: the whole pipeline on the embedded digits data, with no arguments.

float training -> QAT at each W/A pair -> convert -> integer-only run on two runtimes -> one table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..data import load_data
from ..intprog.artifact import load
from ..runtime import run
from .evaluation import artifact_sizes, compare, float_accuracy, images_and_labels, write_json
from .runs import load_qat_model
from .sweep import parse_pairs
from .workflow import digits_args, train_float, train_qat

FLOAT_EPOCHS = 40
QAT_EPOCHS = 20


def demo(
    json_path: str | None = None, out: Path | None = None, bits: str = "4,4;2,2", seed: int = 0
) -> list[dict]:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out else Path(tmp)
        base = dict(seed=seed, log_dir=str(root))
        print(f"[demo] float training: digits_cnn on scikit-learn digits, {FLOAT_EPOCHS} epochs")
        float_result = train_float(digits_args(epochs=FLOAT_EPOCHS, lr=0.05, **base))
        data = load_data("digits")
        images, labels = images_and_labels(data.val)
        float_acc = float_accuracy(float_result["checkpoint"], images, labels)
        rows = []
        for w_bits, a_bits in parse_pairs(bits):
            print(f"[demo] QAT W{w_bits}A{a_bits}: {QAT_EPOCHS} epochs")
            result = train_qat(
                digits_args(
                    epochs=QAT_EPOCHS, lr=0.01, w_num_bits=w_bits, a_num_bits=a_bits, **base
                )
            )
            program_path = Path(result["program"])
            program = load(program_path)
            qat_model, _ = load_qat_model(result["checkpoint"])
            # Integer top-1 from the fast runtime; the reference runs once, to prove them equal.
            cmp = compare(program, qat_model, images, labels, runtime="torch")
            equal = bool(
                np.array_equal(
                    run(program, images.numpy(), "reference"), run(program, images.numpy(), "torch")
                )
            )
            rows.append(
                {
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "float_acc": float_acc,
                    "fakequant_acc": cmp["fakequant_acc"],
                    "int_acc": cmp["int_acc"],
                    "agreement": cmp["agreement"],
                    "runtimes_equal": equal,
                    **artifact_sizes(program, program_path),
                }
            )
    print()
    print(
        f"{'W/A':>5} {'float':>7} {'fakeq':>7} {'int':>7} {'agree':>8} {'ref==torch':>10} "
        f"{'artifact':>9} {'float32':>8}"
    )
    for r in rows:
        print(
            f"{r['w_bits']}/{r['a_bits']:<3} {100 * r['float_acc']:>6.2f}% "
            f"{100 * r['fakequant_acc']:>6.2f}% {100 * r['int_acc']:>6.2f}% "
            f"{100 * r['agreement']:>7.2f}% {str(r['runtimes_equal']):>10} "
            f"{r['artifact_bytes']:>8}B {r['float_bytes']:>7}B"
        )
    print(f"({len(images)} held-out digits images; {time.time() - start:.0f} s)")
    if json_path:
        write_json(json_path, rows)
    return rows
