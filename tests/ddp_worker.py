"""Run by torchrun in test_cli.py: a few QAT steps under DDP, then each rank saves its own state."""

import sys
from pathlib import Path

import torch

from lsqint.app.workflow import RunArgs, train_qat
from lsqint.train import init_distributed, shutdown_distributed

root, init, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist = init_distributed(torch.device("cpu"))
args = RunArgs(
    model="digits_cnn",
    dataset="digits",
    epochs=1,
    batch_size=32,
    lr=0.05,
    log_dir=root,
    init=init,
    cuda=-1,
    max_steps_per_epoch=5,
    progress=False,
)
result = train_qat(args, dist)
torch.save(result["model"].state_dict(), out / f"rank{dist.rank}.pt")
shutdown_distributed()
