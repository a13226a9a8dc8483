"""A run's identity: where its folder is, the metadata its checkpoints carry, and the models
rebuilt from that metadata (float, QAT) with a checkpoint's weights loaded and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import __version__
from .data import Data
from .models import create_model
from .qat import QuantConfig, freeze_batchnorm_, prepare_qat
from .train import CheckpointError, load_checkpoint

PROGRAM_FILE = "best.intprog.safetensors"


def run_dir(log_dir: str, dataset: str, model: str) -> Path:
    """Where a model's runs live: <log-dir>/<dataset>_<model>/{float, w4a4, ...}."""
    return Path(log_dir) / f"{dataset}_{model.replace(':', '-')}"


def qat_dir_name(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


def qat_run_dir(args, w_bits: int, a_bits: int) -> Path:
    """The folder of one QAT run of ``args``' model and dataset (RunArgs or its namespace)."""
    return run_dir(args.log_dir, args.dataset, args.model) / qat_dir_name(w_bits, a_bits)


def model_meta(
    model: str,
    data: Data,
    kind: str,
    dataset: str,
    num_classes: int | None = None,
    quant: QuantConfig | None = None,
) -> dict[str, Any]:
    spec = data.spec
    return {
        "kind": kind,
        "model": model,
        "dataset": dataset,
        "num_classes": num_classes or spec.num_classes,
        "image_size": spec.image_size,
        "in_channels": spec.in_channels,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "quant": quant.to_dict() if quant else None,
        "lsqint_version": __version__,
    }


def build_float_model(meta: dict[str, Any]) -> nn.Module:
    return create_model(
        meta["model"],
        meta["num_classes"],
        meta["image_size"],
        meta["in_channels"],
        meta["mean"],
        meta["std"],
    )


def example_input(meta: dict[str, Any], batch: int = 2) -> torch.Tensor:
    size = meta["image_size"]
    return torch.zeros((batch, meta["in_channels"], size, size), dtype=torch.uint8)


def build_qat_model(
    meta: dict[str, Any], float_model: nn.Module | None = None, weights: dict | None = None
) -> fx.GraphModule:
    """The QAT model ``meta`` describes; BN-aware (``meta["bn_aware_epochs"]``) unless
    ``weights``, the state_dict it is built for, holds the model after its BNs were folded."""
    float_model = float_model if float_model is not None else build_float_model(meta)
    float_model.eval()  # BN folding uses the running statistics
    bn_aware = bool(meta.get("bn_aware_epochs"))
    model = prepare_qat(
        float_model, QuantConfig.from_dict(meta["quant"]), example_input(meta), bn_aware=bn_aware
    )
    if bn_aware and weights is not None and not holds_batchnorm(weights):
        freeze_batchnorm_(model)
    return model


def holds_batchnorm(weights: dict) -> bool:
    """Whether a QAT state_dict was saved before BN-aware QAT folded its BatchNorms."""
    return any(key.endswith(".bn.running_var") for key in weights)


def load_qat_model(path: str | Path) -> tuple[fx.GraphModule, dict[str, Any]]:
    state = load_checkpoint(path)
    meta = state["meta"]
    if meta.get("kind") != "qat":
        raise CheckpointError(
            f"{path} is a {meta.get('kind')} checkpoint, not a QAT one; run `lsqint qat` first"
        )
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN/inf in {bad[0]}; use an earlier checkpoint (best.pt)"
        )
    model = build_qat_model(meta, weights=state["model"])
    load_weights(model, state["model"], path)
    return model, meta


def load_weights(model: nn.Module, weights: dict, path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({first}); pass the "
            "checkpoint of the same --model and --num-classes"
        ) from None
