"""Datasets as uint8 arrays: train, validation (carved from the training set) and test splits, plus
class names. `select_splits` picks what a run trains on and evaluates; `overlap` is the leakage guard."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.cifar import load_cifar
from pipelines.contract import DataError
from pipelines.synthetic import make_synthetic

EVAL_SPLITS = ("val", "test")
CLASS_COUNTS = {"cifar10": 10, "cifar100": 100}  # synthetic: --num-classes


def num_classes(dataset: str, synthetic_classes: int) -> int:
    """Classes of `dataset`, known before loading it (plans and listings need no data)."""
    return CLASS_COUNTS.get(dataset, synthetic_classes)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # N x H x W x 3, uint8
    labels: np.ndarray  # N, int64

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "Split") -> "Split":
        return Split(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split   # the training set less the validation split
    val: Split
    test: Split
    classes: list[str]

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


def select_splits(data: Dataset, eval_split: str, final: bool) -> tuple[Split, Split]:
    """(train, eval): validation by default; `--eval-split test` scores the test split; `--final`
    trains on train + val and scores the test split (seed 000's last step)."""
    if final:
        return data.train + data.val, data.test
    if eval_split not in EVAL_SPLITS:
        raise DataError(f"unknown --eval-split {eval_split!r}; choose from: {', '.join(EVAL_SPLITS)}")
    return data.train, data.val if eval_split == "val" else data.test


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def overlap(train: Split, evaluation: Split) -> int:
    """How many evaluation images also appear, byte for byte, in the training split. Seed 004 built its
    "test" set from the training files and reported 98.65 %; a non-zero count withholds accuracy."""
    seen = {_digest(image) for image in train.images}
    return sum(_digest(image) in seen for image in evaluation.images)


def _synthetic(*, num_classes: int, train_size: int, val_size: int, seed: int, **_) -> Dataset:
    # Distinct sample seeds per split: the same classes, no shared images.
    train = Split(*make_synthetic(train_size, num_classes, seed=3 * seed + 1))
    val = Split(*make_synthetic(val_size, num_classes, seed=3 * seed + 2))
    test = Split(*make_synthetic(val_size, num_classes, seed=3 * seed + 3))
    return Dataset("synthetic", train, val, test, [f"class_{i}" for i in range(num_classes)])


def _writable_dir(data_dir: str | os.PathLike) -> Path:
    path = Path(data_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--data-dir {path}: cannot be created ({e.strerror}); choose a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"--data-dir {path}: not writable; choose a writable directory")
    return path


def _cifar(name: str) -> Callable[..., Dataset]:
    def load(*, data_dir: str | os.PathLike, val_size: int, seed: int, download: bool = True, **_) -> Dataset:
        parts = load_cifar(name, _writable_dir(data_dir), download=download)
        images, labels = parts["train"]
        train_idx, val_idx = stratified_split(labels, val_size, seed)
        return Dataset(name, Split(images[train_idx], labels[train_idx]), Split(images[val_idx], labels[val_idx]),
                       Split(*parts["test"]), parts["classes"])
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
