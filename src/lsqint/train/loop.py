"""One training loop for float training and QAT: SGD + cosine, AMP, checkpoints, exact resume."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..errors import TrainingError
from ..qat.prepare import freeze_batchnorm_
from ..quant import LSQQuantizer
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    amp: bool = False
    out_dir: str = "runs/model"
    resume: bool = False
    log_dir: str | None = None
    progress: bool = True
    max_steps_per_epoch: int | None = None  # for smoke tests: cut every epoch short
    overwrite: bool = False  # a fresh run may replace the run already in out_dir
    # BN-aware QAT: after this many epochs the model's QuantConvBn2d layers fold for good.
    bn_freeze_epoch: int | None = None
    # Clip the gradients' total L2 norm to this before each step (None: no clipping).
    grad_clip: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on step sizes, biases or norm parameters: decaying a step size shrinks the
    # quantization range for no reason.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith(".scale") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def cosine_schedule(optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean loss over a loader. Under DDP each rank reads its own shard of
    the split (every image once, no padding: ``data.make_loader``) and the counts are summed
    over ranks, so every rank returns the whole split's figures. ``model`` must be the plain
    module, not the DDP wrapper: shards may differ in batch count, and DDP's forward joins a
    collective per batch."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for images, labels in loader:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    loss_sum, correct, total = all_reduce_sum([loss_sum, correct, total], device)
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


class Trainer:
    """Trains ``model`` for cfg.epochs; checkpoints ``last.pt`` every epoch and ``best.pt``."""

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        val_loader,
        cfg: TrainConfig,
        device: torch.device,
        dist_info: DistInfo | None = None,
        on_best=None,
        criterion=None,
    ) -> None:
        """``criterion(logits, labels, images) -> loss`` replaces cross-entropy (distillation)."""
        self.model = model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or DistInfo()
        self.out = Path(cfg.out_dir)
        self.on_best = on_best
        self.criterion = criterion
        self.quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
        steps = (
            len(train_loader)
            if cfg.max_steps_per_epoch is None
            else min(len(train_loader), cfg.max_steps_per_epoch)
        )
        if steps == 0:
            raise TrainingError(
                "the training split is empty on this process (0 batches); check --data-root "
                "(and, under torchrun, that every process gets images)"
            )
        self.steps_per_epoch = steps
        self._wrap_model()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
        self.epoch = 0
        self.best_acc = -1.0
        self.history: list[dict[str, Any]] = []
        self.writer = None

    def _wrap_model(self) -> None:
        """DDP wrapper, optimizer and cosine schedule for the model as it is now."""
        self.net = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = cosine_schedule(self.optimizer, self.cfg.epochs * self.steps_per_epoch)

    def _freeze_batchnorm(self) -> bool:
        """BN-aware QAT: fold the BatchNorms for good once bn_freeze_epoch epochs are done.
        The folded layers are new parameters: optimizer and DDP are rebuilt (momentum restarts),
        the schedule continues where it was."""
        due = self.cfg.bn_freeze_epoch is not None and self.epoch >= self.cfg.bn_freeze_epoch
        if not due or not freeze_batchnorm_(self.model):
            return False
        done = self.scheduler.last_epoch
        self._wrap_model()
        self.scheduler.last_epoch = done
        for group, base, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base * factor(done)
        self._print(f"epoch {self.epoch}: BatchNorm statistics frozen and folded into the convs")
        return True

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "meta": self.cfg.meta,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "epoch": self.epoch,
            "best_acc": self.best_acc,
            "rng": rng_state(),
            "history": json.dumps(self.history),
        }

    def _optimizer_flags(self) -> dict[str, float | None]:
        """The flags that shape every optimizer step; a resumed run must keep them (``-e`` may
        grow: resuming to more epochs is how a run is extended)."""
        c = self.cfg
        return {
            "lr": c.lr,
            "momentum": c.momentum,
            "weight_decay": c.weight_decay,
            "grad_clip": c.grad_clip,
        }

    def _check_resume_flags(self, saved: dict[str, Any], path: Path) -> None:
        flags = {
            "lr": "--lr",
            "momentum": "--momentum",
            "weight_decay": "--wd",
            "grad_clip": "--grad-clip",
        }
        for key, now in self._optimizer_flags().items():
            if key in saved and saved[key] != now:
                raise TrainingError(
                    f"--resume of {path}: {flags[key]} is {now} but the run was trained with "
                    f"{saved[key]}; pass {flags[key]} {saved[key]} to continue it, or start a "
                    "new run in another --log-dir"
                )

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        # Checkpoints from before optimizer flags were recorded carry none: nothing to compare.
        self._check_resume_flags(state["meta"].get("optimizer_flags", {}), path)
        self.epoch = int(state["epoch"])
        self._freeze_batchnorm()  # the checkpoint was saved after the freeze
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.epoch = int(state["epoch"])
        self.best_acc = float(state["best_acc"])
        self.history = json.loads(state["history"])
        set_rng_state(state["rng"])
        self.cfg.meta["run_id"] = state["meta"].get("run_id")  # a resumed run keeps its id

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        last = self.out / "last.pt"
        if self.cfg.resume:
            self.restore(last)
            self._print(f"resumed from {last} at epoch {self.epoch}")
        else:
            self._refuse_to_replace_a_run()
            self.cfg.meta["run_id"] = uuid.uuid4().hex  # best.pt and its program carry it
        self.cfg.meta["optimizer_flags"] = self._optimizer_flags()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.cfg.log_dir:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.cfg.log_dir)
        self._print(
            f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} "
            f"{'val_loss':>9} {'val_acc':>8} {'best':>7} {'time_s':>7}"
        )
        while self.epoch < self.cfg.epochs:
            self._freeze_batchnorm()
            start = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            train = self._train_epoch()
            val = evaluate(self.model, self.val_loader, self.device, self.cfg.amp)
            self.epoch += 1
            improved = val["acc"] > self.best_acc
            self.best_acc = max(self.best_acc, val["acc"])
            row = {
                "epoch": self.epoch,
                "lr": lr,
                "train_loss": train["loss"],
                "train_acc": train["acc"],
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "best_acc": self.best_acc,
                "time_s": time.time() - start,
            }
            self.history.append(row)
            if self.dist.is_main:
                self._checkpoint(improved)
                self._log(row)
            self._print(
                f"{row['epoch']:>5d} {lr:>9.5f} {row['train_loss']:>10.4f} "
                f"{row['train_acc']:>9.4f} {row['val_loss']:>9.4f} {row['val_acc']:>8.4f} "
                f"{self.best_acc:>7.4f} {row['time_s']:>7.1f}"
            )
        if self.writer:
            self.writer.close()
        return {"best_acc": self.best_acc, "history": self.history}

    def _train_epoch(self) -> dict[str, float]:
        self.net.train()
        loss_sum = correct = total = 0.0
        amp = self.cfg.amp and self.device.type == "cuda"
        bar = tqdm(
            self.train_loader,
            total=self.steps_per_epoch,
            leave=False,
            disable=not (self.cfg.progress and self.dist.is_main),
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
        )
        for step, (images, labels) in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            with torch.autocast(self.device.type, enabled=amp):
                logits = self.net(images)
                if self.criterion is None:
                    loss = nn.functional.cross_entropy(logits.float(), labels)
                else:
                    loss = self.criterion(logits, labels, images)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {self.epoch + 1}, step {step + 1}; "
                    f"lower --lr (now {self.cfg.lr}) or check the data. Checkpoints in "
                    f"{self.out} are untouched"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip is not None:
                # Low-bit QAT's first gradients are huge (W2A2 resnet20 from a W3A3 checkpoint:
                # total norm ~45); one unclipped step at lr 0.01 drives the last stage's ReLUs
                # to 99 % zero codes, where the gradient vanishes and training never recovers.
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for q in self.quantizers:
                q.clamp_scale_()
            self.scheduler.step()
            n = labels.numel()
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == labels).sum().item()
            total += n
            bar.set_postfix(loss=f"{loss.item():.3f}")
        loss_sum, correct, total = all_reduce_sum([loss_sum, correct, total], self.device)
        return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}

    def _refuse_to_replace_a_run(self) -> None:
        """A fresh run never replaces the work already in its folder without --overwrite."""
        if self.cfg.overwrite or not self.dist.is_main:
            return
        for name in ("best.pt", "last.pt"):
            if (self.out / name).is_file():
                try:
                    earlier = load_checkpoint(self.out / name)
                    best = f"best val top-1 {float(earlier['best_acc']):.4f}, "
                    best += f"{int(earlier['epoch'])} epochs"
                except Exception:  # unreadable: still somebody's work
                    best = "unreadable"
                raise TrainingError(
                    f"{self.out} already holds a run ({best}); pass --resume to continue it, "
                    "--overwrite to replace it, or another --log-dir"
                )

    def _checkpoint(self, improved: bool) -> None:
        self.cfg.meta["epoch"] = self.epoch
        state = self.state()
        if improved:
            # The program first: if convert fails, best.pt and its program stay the earlier,
            # matching pair (both carry the run id and epoch; `lsqint infer` checks them).
            if self.on_best is not None:
                self.on_best(self.model, self.out, self.cfg.meta)
            save_checkpoint(state, self.out / "best.pt")
        save_checkpoint(state, self.out / "last.pt")
        metrics = self.out / "metrics.json"
        tmp = metrics.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(
                {"meta": self.cfg.meta, "best_acc": self.best_acc, "epochs": self.history}, indent=2
            )
        )
        os.replace(tmp, metrics)

    def _log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def _print(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)
