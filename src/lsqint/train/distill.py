"""Knowledge distillation (Hinton et al. 2015) from a float teacher, as the LSQ paper uses at 2-4
bits:

    loss = (1 - alpha) * CE(student, labels)
           + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

T^2 keeps the soft term's gradient on the scale of the label term whatever the temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UsageError


class DistillLoss:
    """A training criterion ``(logits, labels, images) -> loss`` with a frozen teacher."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5) -> None:
        if not temperature > 0:
            raise UsageError(f"--distill-t must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--distill-alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def __call__(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        return distill_loss(logits.float(), teacher_logits, labels, self.temperature, self.alpha)


def distill_loss(
    student: Tensor, teacher: Tensor, labels: Tensor, temperature: float, alpha: float
) -> Tensor:
    hard = F.cross_entropy(student, labels)
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * (t * t) * soft
