"""A run's identity: where its folder is, the metadata its checkpoints carry, and the models
rebuilt from that metadata (float, QAT) with a checkpoint's weights loaded and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .. import __version__
from ..data import Data
from ..models import create_model
from ..qat import QuantConfig, freeze_batchnorm_, prepare_qat
from ..train import CheckpointError, load_checkpoint

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


def load_plain_state_dict(path) -> dict[str, torch.Tensor] | None:
    """A file that holds only a model's weights (a plain ``state_dict``, as torchvision's
    pretrained downloads, optionally under 'state_dict' or 'model'); None for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: load_checkpoint's error says so
        return None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not state or not isinstance(state, dict):
        return None
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        return None
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP's saved prefix


def fit_plain_state_dict(model: nn.Module, weights: dict, path) -> dict[str, torch.Tensor]:
    """``weights`` (a plain state_dict) as a full state_dict of ``model``: keys are matched as
    they are or under the model's torchvision wrapper (``1.``, after lsqint's Normalize); a
    classifier of another class count is left at its initialization, and said so; anything else
    that does not match is refused naming the first few keys."""
    own = model.state_dict()
    prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in own if "." in k})
    prefix = max(prefixes, key=lambda p: sum(p + k in own for k in weights))
    mapped = {prefix + k: v for k, v in weights.items()}
    unknown = [k for k in mapped if k not in own]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} weights are not in --model's state_dict (first: "
            f"{', '.join(k.removeprefix(prefix) for k in unknown[:3])}); pass weights of the "
            "same architecture"
        )
    shape_mismatch = [k for k, v in mapped.items() if v.shape != own[k].shape]
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    classifier = {f"{n}.{p}" for n in last_linear for p in ("weight", "bias")}
    if shape_mismatch and not set(shape_mismatch) <= classifier:
        first = [k for k in shape_mismatch if k not in classifier][:3]
        raise CheckpointError(
            f"{path}: weight shapes differ from --model's ("
            + ", ".join(f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in first)
            + "); pass weights of the same architecture"
        )
    if shape_mismatch:
        print(
            f"[init] {path}: classifier has {mapped[shape_mismatch[0]].shape[0]} outputs, the "
            f"model {own[shape_mismatch[0]].shape[0]}: the classifier is left at its "
            "initialization (fine-tune it)"
        )
    missing = [
        k for k in own if k not in mapped and k.split(".")[-1] not in ("mean", "std")
    ]  # lsqint's Normalize statistics come from the dataset, not the file
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} of --model's weights are not in the file (first: "
            f"{', '.join(missing[:3])}); pass weights of the same architecture"
        )
    fitted = dict(own)
    fitted.update({k: v for k, v in mapped.items() if k not in shape_mismatch})
    return fitted
