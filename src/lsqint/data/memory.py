"""In-memory uint8 datasets and a loader that augments whole batches on the training device.

Small datasets (CIFAR, digits) fit in memory as one uint8 tensor; random crop (zero padding 4) and
horizontal flip run batched on tensors, as the fast CIFAR trainers do: no per-image Python work.
All randomness comes from the loader's own torch.Generator, whose state a checkpoint saves, so a
resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W), int64 labels (N,), and the classes' names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UsageError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise UsageError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def random_crop_flip(images: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-image random crop from a zero-padded batch, and a random horizontal flip, batched."""
    n, _, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images.contiguous()


class TensorLoader:
    """Batches of an ImageSet on ``device``; shuffled and augmented when ``train``.

    Under DDP each rank draws the same permutation and takes its own shard ``perm[rank::world]``.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        train: bool,
        device="cpu",
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.pad, self.flip = (pad, flip) if train else (0, False)
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def _indices(self) -> Tensor:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.labels), self.world_size))
        # A split smaller than one batch trains on what it has (one short batch) rather than
        # on nothing.
        drop_last = self.drop_last and n >= self.batch_size
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices().to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.pad or self.flip:
                images = random_crop_flip(images, self.pad, self.flip, self.generator)
            yield images, self.labels[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
