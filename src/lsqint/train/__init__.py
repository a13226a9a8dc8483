"""The training loop, checkpoints, distributed setup."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .loop import TrainConfig, Trainer, TrainingError, evaluate

__all__ = [
    "CheckpointError",
    "DistInfo",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "save_checkpoint",
    "shutdown_distributed",
]
