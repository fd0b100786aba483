"""Datasets as uint8 arrays: one training split and one evaluation split, plus class names and the
per-channel statistics used for normalisation. Loaders (DALI) turn these into batches."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipelines.cifar import DataError, load_cifar
from pipelines.synthetic import make_synthetic

# Seed 000's normalisation (the CIFAR-10 training statistics, used for CIFAR-100 too).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # N x H x W x 3, uint8
    labels: np.ndarray  # N, int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    eval: Split
    classes: list[str]
    mean: tuple[float, float, float]  # in [0, 1]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_size` images taken evenly from every class, chosen by `seed`."""
    classes = np.unique(labels)
    if not 0 < val_size < len(labels) or val_size % len(classes):
        raise DataError(f"--val-size {val_size}: must be a multiple of the {len(classes)} classes "
                        f"and below the {len(labels)} training images")
    rng = np.random.default_rng(seed)
    per_class = val_size // len(classes)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, np.sort(val)


def _synthetic(*, num_classes: int, train_size: int, val_size: int, seed: int, **_) -> Dataset:
    # Different sample seeds for the two splits: same classes, no shared images.
    train = Split(*make_synthetic(train_size, num_classes, seed=2 * seed + 1))
    held_out = Split(*make_synthetic(val_size, num_classes, seed=2 * seed + 2))
    pixels = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    return Dataset("synthetic", train, held_out, [f"class_{i}" for i in range(num_classes)],
                   tuple(pixels.mean(0).round(4)), tuple(pixels.std(0).round(4)))


def _cifar(name: str) -> Callable[..., Dataset]:
    def load(*, data_dir: str | os.PathLike, val_size: int, seed: int, download: bool = True, **_) -> Dataset:
        parts = load_cifar(name, data_dir, download=download)
        images, labels = parts["train"]
        train_idx, val_idx = stratified_split(labels, val_size, seed)
        return Dataset(name, Split(images[train_idx], labels[train_idx]),
                       Split(images[val_idx], labels[val_idx]), parts["classes"], CIFAR_MEAN, CIFAR_STD)
    return load


DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
}


def load_dataset(name: str, **options) -> Dataset:
    """Options: data_dir, val_size, seed; for synthetic also num_classes and train_size."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return DATASETS[name](**options)
