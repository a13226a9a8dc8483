"""Evaluation of integer programs against the QAT model they came from: top-1, label
agreement, throughput and file sizes, on the same images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import ImageSet
from ..intprog import IntProgram
from ..intprog.artifact import float_state_bytes, program_num_params
from ..runtime import CompiledProgram, run
from ..train import load_checkpoint
from .runs import build_float_model


def images_and_labels(dataset: ImageSet | Any, limit: int | None = None):
    """All (or the first ``limit``) evaluation images as one uint8 tensor, with labels."""
    if isinstance(dataset, ImageSet):
        images, labels = dataset.images, dataset.labels
    else:
        n = len(dataset)
        index = (
            range(n)
            if limit is None or limit >= n
            else (torch.linspace(0, n - 1, limit).round().long().tolist())
        )
        pairs = [dataset[i] for i in index]
        images = torch.stack([p[0] for p in pairs])
        labels = torch.tensor([p[1] for p in pairs])
        return images.contiguous(), labels
    if limit is not None and limit < len(labels):
        # Evenly spaced, so a class-sorted folder still gives every class.
        pick = torch.linspace(0, len(labels) - 1, limit).round().long()
        images, labels = images[pick], labels[pick]
    return images.contiguous(), labels


def integer_predictions(
    program: IntProgram,
    images: torch.Tensor,
    runtime: str = "torch",
    batch_size: int = 256,
    device: str = "cpu",
) -> tuple[np.ndarray, float]:
    """(predicted labels, images/s) of an integer program over ``images``. Runtimes with a build
    step (torch, onnx) are built once, outside the timed loop."""
    compiled = None
    if runtime in ("torch", "torch-int8"):
        compiled = CompiledProgram(program, device, int8_gemm=runtime == "torch-int8")
    elif runtime in ("onnx", "onnx-qlinear"):
        from ..export.onnx_int import OnnxSession

        compiled = OnnxSession(program, qlinear=runtime == "onnx-qlinear")
    preds = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].numpy()
        logits = compiled(batch) if compiled else run(program, batch, runtime=runtime)
        preds.append(logits.argmax(1))
    seconds = time.perf_counter() - start
    return np.concatenate(preds), len(images) / max(seconds, 1e-9)


@torch.no_grad()
def fakequant_predictions(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, float64: bool = False
):
    """Predicted labels of a float or QAT model. ``float64`` evaluates a float64 copy: the QAT
    model's arithmetic without float32 accumulation noise (see ``compare``)."""
    if float64:
        import copy

        model = copy.deepcopy(model).double()
    model.eval()
    return np.concatenate(
        [
            model(images[i : i + batch_size]).argmax(1).numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def float_accuracy(checkpoint, images, labels) -> float:
    """Top-1 of a float checkpoint's model on ``images``."""
    state = load_checkpoint(checkpoint)
    model = build_float_model(state["meta"])
    model.load_state_dict(state["model"])
    return float((fakequant_predictions(model, images) == labels.numpy()).mean())


def compare(
    program: IntProgram,
    qat_model: nn.Module | None,
    images,
    labels,
    runtime: str = "torch",
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Integer top-1, fake-quant top-1 and their label agreement on the same images.

    The QAT model is evaluated twice: in float32 (as it trains; ``fakequant_acc``) and as a
    float64 copy (``fakequant_f64_acc``). Near a rounding boundary float32 accumulation noise flips
    codes in the QAT model itself (two float32 evaluations in different summation orders disagree
    the same way), so ``agreement``/``flips`` compare the program with the float64 evaluation, and
    ``agreement_f32``/``flips_f32`` with the float32 one. Both are reported."""
    labels_np = labels.numpy()
    int_pred, ips = integer_predictions(program, images, runtime, batch_size, device)
    row: dict[str, Any] = {
        "images": len(labels_np),
        "int_acc": float((int_pred == labels_np).mean()),
        "images_per_s": ips,
        "runtime": runtime,
        "device": str(device),
    }
    if qat_model is not None:
        fq_pred = fakequant_predictions(qat_model, images, batch_size)
        fq64_pred = fakequant_predictions(qat_model, images, batch_size, float64=True)
        row["fakequant_acc"] = float((fq_pred == labels_np).mean())
        row["fakequant_f64_acc"] = float((fq64_pred == labels_np).mean())
        row["agreement"] = float((fq64_pred == int_pred).mean())
        row["flips"] = int((fq64_pred != int_pred).sum())
        row["agreement_f32"] = float((fq_pred == int_pred).mean())
        row["flips_f32"] = int((fq_pred != int_pred).sum())
    return row


def artifact_sizes(program: IntProgram, path: Path) -> dict[str, int]:
    return {
        "artifact_bytes": path.stat().st_size,
        "float_bytes": float_state_bytes(program_num_params(program)),
    }


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
