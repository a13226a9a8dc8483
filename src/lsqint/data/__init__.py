"""Datasets and loaders: in-memory uint8 tensors for small sets, streamed folders for large ones."""

from .datasets import (
    DATASETS,
    Data,
    DatasetError,
    DataSpec,
    digits,
    load_data,
    make_loader,
    synthetic,
)
from .memory import ImageSet, TensorLoader, random_crop_flip

__all__ = [
    "DATASETS",
    "Data",
    "DataSpec",
    "DatasetError",
    "ImageSet",
    "TensorLoader",
    "digits",
    "load_data",
    "make_loader",
    "random_crop_flip",
    "synthetic",
]
