"""Datasets by name: digits (embedded), synthetic (tests), CIFAR-10/100, ImageNet, Tiny-ImageNet,
folder.

Every dataset yields uint8 images; the model's own Normalize module turns them into floats.
Nothing is downloaded unless the user asks (``download=True`` for CIFAR).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from .memory import ImageSet, TensorLoader

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Environment variables the seed project read its dataset roots from.
ROOT_ENV = {
    "cifar10": "CIFAR10_ROOT",
    "cifar100": "CIFAR100_ROOT",
    "imagenet": "IMAGENET_ROOT",
    "tiny-imagenet": "TINYIMAGENET_ROOT",
    "folder": "DATA_ROOT",
}
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet", "tiny-imagenet", "folder")


@dataclass
class DataSpec:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int = 4  # random-crop padding of in-memory training batches
    flip: bool = True  # random horizontal flips (never for digits: a flipped 2 is no 2)


@dataclass
class Data:
    spec: DataSpec
    train: object  # ImageSet or a torchvision dataset
    val: object


def digits(image_size: int = 8) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): a fixed 80/20 split.

    Pixel values 0..16 are scaled to 0..255; ``image_size`` a multiple of 8 upsamples (nearest).
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    if image_size % 8:
        raise DatasetError(f"digits: --image-size must be a multiple of 8, got {image_size}")
    factor = image_size // 8
    images = images.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(labels))
    classes = [str(i) for i in range(10)]
    train = ImageSet(images[order[:split]].contiguous(), labels[order[:split]], classes)
    val = ImageSet(images[order[split:]].contiguous(), labels[order[split:]], classes)
    spec = DataSpec("digits", 10, 1, image_size, (0.5,), (0.5,), crop_pad=factor, flip=False)
    return Data(spec, train, val)


def synthetic(
    num_classes: int = 4,
    image_size: int = 16,
    channels: int = 3,
    train_size: int = 256,
    val_size: int = 64,
    seed: int = 0,
) -> Data:
    """Learnable random data for tests: each class is a noisy version of its own random pattern."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (num_classes, channels, image_size, image_size), generator=g)

    def make(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randint(-40, 41, (n, channels, image_size, image_size), generator=g)
        images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, [f"class{i}" for i in range(num_classes)])

    spec = DataSpec(
        "synthetic", num_classes, channels, image_size, (0.5,) * channels, (0.25,) * channels
    )
    return Data(spec, make(train_size), make(val_size))


def resolve_root(name: str, data_root: str | None) -> Path:
    root = data_root or os.environ.get(ROOT_ENV.get(name, ""), "")
    if not root:
        raise DatasetError(
            f"{name}: no dataset root given; pass --data-root DIR or set "
            f"{ROOT_ENV.get(name, 'DATA_ROOT')}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{name}: dataset root {path} does not exist; pass --data-root with the "
            "folder that holds the data"
        )
    return path


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    train = root / "train"
    for val_name in ("val", "test"):
        if train.is_dir() and (root / val_name).is_dir():
            return train, root / val_name
    return None


def _load_folder_in_memory(folder: Path, cache_dir: Path | None) -> ImageSet:
    """Decode an ImageFolder tree of small images into one uint8 tensor (cached as .npz)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder))
    if not ds.samples:
        raise DatasetError(f"{folder}: no images found (expected <class>/<image> files)")
    key = hashlib.sha1(f"{folder.resolve()}:{len(ds.samples)}".encode()).hexdigest()[:16]
    cache = cache_dir / f"{folder.name}-{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            return ImageSet(
                torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]), ds.classes
            )
    images = (
        torch.from_numpy(
            np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in ds.samples])
        )
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images.numpy(), labels=labels.numpy())
        os.replace(tmp, cache)
    return ImageSet(images, labels, ds.classes)


def cifar(name: str, data_root: str | None, download: bool = False) -> Data:
    """CIFAR-10/100 from torchvision's folder format, or an ImageFolder tree (train/, val|test/)."""
    num_classes = 10 if name == "cifar10" else 100
    spec = DataSpec(name, num_classes, 3, 32, CIFAR_MEAN, CIFAR_STD)
    if download and data_root:
        Path(data_root).mkdir(parents=True, exist_ok=True)
    root = resolve_root(name, data_root)
    dirs = _split_dirs(root)
    if dirs is not None:
        cache = Path(os.environ.get("LSQINT_CACHE", Path.home() / ".cache" / "lsqint"))
        train, val = (_load_folder_in_memory(d, cache) for d in dirs)
        return Data(spec, train, val)
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        sets = [cls(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as err:
        raise DatasetError(
            f"{name}: not found under {root} ({err}); point --data-root at "
            "torchvision's CIFAR folder or an ImageFolder tree with train/ and val/, "
            "or pass --download"
        ) from None
    train, val = (
        ImageSet(
            torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(s.targets),
            list(s.classes),
        )
        for s in sets
    )
    return Data(spec, train, val)


def image_folder(name: str, data_root: str | None, image_size: int | None) -> Data:
    """ImageNet / Tiny-ImageNet / any ImageFolder tree, streamed through torchvision transforms."""
    from torchvision import datasets
    from torchvision.transforms import v2

    root = resolve_root(name, data_root)
    dirs = _split_dirs(root)
    if dirs is None:
        raise DatasetError(f"{name}: {root} must contain train/ and val/ (or test/) class folders")
    size = image_size or {"imagenet": 224, "tiny-imagenet": 64}.get(name, 224)
    resize = int(round(size / 0.875))
    train_tf = v2.Compose(
        [v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    )
    val_tf = v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
    train = datasets.ImageFolder(str(dirs[0]), transform=train_tf)
    val = datasets.ImageFolder(str(dirs[1]), transform=val_tf)
    spec = DataSpec(name, len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD)
    return Data(spec, train, val)


def load_data(
    name: str, data_root: str | None = None, image_size: int | None = None, download: bool = False
) -> Data:
    """Load a dataset by name (see DATASETS)."""
    if name == "digits":
        return digits(image_size or 8)
    if name == "synthetic":
        return synthetic(image_size=image_size or 16)
    if name in ("cifar10", "cifar100"):
        return cifar(name, data_root, download)
    if name in ("imagenet", "tiny-imagenet", "folder"):
        return image_folder(name, data_root, image_size)
    import difflib

    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise DatasetError(f"unknown dataset {name!r}{hint} (available: {', '.join(DATASETS)})")


def make_loader(
    dataset,
    batch_size: int,
    train: bool,
    device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    spec: DataSpec | None = None,
):
    """A TensorLoader for in-memory sets; a DataLoader (DistributedSampler under DDP) otherwise."""
    if isinstance(dataset, ImageSet):
        pad, flip = (spec.crop_pad, spec.flip) if spec else (4, True)
        return TensorLoader(
            dataset,
            batch_size,
            train,
            device,
            seed,
            pad=pad,
            flip=flip,
            rank=rank,
            world_size=world_size,
        )
    return StreamLoader(dataset, batch_size, train, device, seed, rank, world_size, workers)


class StreamLoader:
    """DataLoader over a folder dataset, reseeded per epoch: resumed runs replay the same order."""

    def __init__(self, dataset, batch_size, train, device, seed, rank, world_size, workers):
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.epoch = 0
        # Training: DistributedSampler's shuffled, equal shards. Validation: every image exactly
        # once (DistributedSampler would pad the last shard with repeats, counted twice).
        self.sampler = (
            DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
            if train
            else _Shard(len(dataset), rank, world_size)
        )
        self.loader = DataLoader(
            dataset,
            batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            # A split smaller than one batch trains on what it has (one short batch).
            drop_last=train and len(self.sampler) >= batch_size,
            persistent_workers=workers > 0,
        )

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for images, labels in self.loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


class _Shard:
    """Indices rank, rank + world, ... of a dataset: one rank's share, no repeats."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
