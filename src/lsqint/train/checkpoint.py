"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values only:
    meta       what was trained: kind ("float" | "qat"), model, dataset, classes, image size,
               normalization, quant config, lsqint version
    model      state_dict          optimizer / scheduler / loader   their state_dicts
    epoch      epochs completed    best_acc    rng (torch CPU and CUDA generator states)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = "lsqint-checkpoint"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    state = {"format": FORMAT, **state}
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one first (lsqint train) "
            "or pass the right path"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupted "
            f"({type(err).__name__}); use another checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an lsqint checkpoint (foreign file); pass a checkpoint "
            "written by lsqint train/qat"
        )
    return state


def check_compatible(meta: dict[str, Any], path, **expected) -> None:
    """Refuse a checkpoint made for another model/dataset/kind, naming the mismatch."""
    for key, value in expected.items():
        if value is not None and meta.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} is for {key}={meta.get(key)!r}, not {value!r}; pass a "
                f"checkpoint of the same {key} or change --{key.replace('_', '-')}"
            )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
