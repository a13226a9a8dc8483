"""Loaders under DDP: validation reads every image exactly once over the ranks (no padded
repeats), so summed counts are the whole split's; a training split smaller than one batch still
yields a batch."""

import torch
from torch.utils.data import TensorDataset

from lsqint.data import make_loader
from lsqint.data.memory import ImageSet


def _labels_seen(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


def test_validation_shards_cover_the_split_once_in_memory_and_streamed():
    n, world = 7, 3
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(n)
    for dataset in (ImageSet(images, labels, ["a"]), TensorDataset(images, labels)):
        seen = []
        for rank in range(world):
            loader = make_loader(dataset, 2, False, "cpu", rank=rank, world_size=world, workers=0)
            seen += _labels_seen(loader)
        assert sorted(seen) == list(range(n)), type(dataset).__name__


def test_a_training_split_smaller_than_one_batch_yields_one_short_batch():
    images = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(5)
    for dataset in (ImageSet(images, labels, ["a"]), TensorDataset(images, labels)):
        loader = make_loader(dataset, 8, True, "cpu", workers=0)
        assert len(loader) == 1
        assert sorted(_labels_seen(loader)) == list(range(5)), type(dataset).__name__
