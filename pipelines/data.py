"""Datasets: train, validation (carved from the training set) and test splits, plus class names. CIFAR
and synthetic splits are uint8 arrays (`Split`); image folders are lists of files (`FileSplit`,
`pipelines.folder`). `select_splits` picks what a run trains on and evaluates; `overlap` is the
leakage guard."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.cifar import load_cifar
from pipelines.contract import DataError
from pipelines.folder import FileSplit, classes_of, folder_path, load_folder, pixel_digest
from pipelines.synthetic import make_synthetic

EVAL_SPLITS = ("val", "test")
CLASS_COUNTS = {"cifar10": 10, "cifar100": 100}  # synthetic: --num-classes


def num_classes(dataset: str, synthetic_classes: int) -> int:
    """Classes of `dataset`, known before loading it (plans and listings read no image)."""
    root = folder_path(dataset)
    if root is not None:
        return len(classes_of(root))
    return CLASS_COUNTS.get(dataset, synthetic_classes)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # N x H x W x 3, uint8
    labels: np.ndarray  # N, int64

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "Split") -> "Split":
        return Split(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]))

    @property
    def digests(self) -> np.ndarray:
        return np.array([pixel_digest(image) for image in self.images], dtype="S16")

    def picture(self, i: int) -> np.ndarray:
        return self.images[i]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split | FileSplit   # the training set less the validation split
    val: Split | FileSplit
    test: Split | FileSplit | None  # an image folder may have none
    classes: list[str]
    info: dict = field(default_factory=dict)  # what the run info records about the files (folders)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: np.ndarray, val_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), chosen by `seed`: a count `val_size` takes the same number of images from
    every class; a fraction takes that share of every class (rounded, at least one, never all)."""
    classes, counts = np.unique(labels, return_counts=True)
    if isinstance(val_size, float):
        per_class = np.clip(np.rint(val_size * counts).astype(int), 1, counts - 1)
        if (counts < 2).any():
            raise DataError(f"--val-size {val_size}: class {classes[counts.argmin()]} has "
                            f"{counts.min()} image; every class needs two to be split")
    else:
        if not 0 < val_size < len(labels) or val_size % len(classes) or val_size // len(classes) >= counts.min():
            raise DataError(f"--val-size {val_size}: must be a multiple of the {len(classes)} classes and leave every "
                            f"class a training image (the smallest has {counts.min()} of {len(labels)} images); "
                            f"or give a fraction such as 0.1")
        per_class = np.full(len(classes), val_size // len(classes))
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, np.sort(val)


def select_splits(data: Dataset, eval_split: str, final: bool) -> tuple[Split, Split]:
    """(train, eval): validation by default; `--eval-split test` scores the test split; `--final`
    trains on train + val and scores the test split (seed 000's last step)."""
    if eval_split not in EVAL_SPLITS:
        raise DataError(f"unknown --eval-split {eval_split!r}; choose from: {', '.join(EVAL_SPLITS)}")
    if (final or eval_split == "test") and data.test is None:
        raise DataError(f"{data.name} has no test split (no test/ folder); score val, without --final "
                        f"or --eval-split test")
    if final:
        return data.train + data.val, data.test
    return data.train, data.val if eval_split == "val" else data.test


def overlap(train: Split | FileSplit, evaluation: Split | FileSplit) -> int:
    """How many evaluation images also appear, pixel for pixel, in the training split (for files: after
    decoding, so a renamed or resaved copy counts too). Seed 004 built its "test" set from the training
    files and reported 98.65 %; a non-zero count withholds accuracy."""
    seen = set(train.digests.tolist())
    return sum(d in seen for d in evaluation.digests.tolist())


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


def _folder(root: Path, *, val_size: int | float, seed: int, skip_bad_images: bool = False,
            data_dir: str | os.PathLike | None = None, **_) -> Dataset:
    splits, classes, info = load_folder(root, skip_bad_images=skip_bad_images, data_dir=data_dir)
    if "val" not in splits:  # one tree: the validation split is drawn from it
        train_idx, val_idx = stratified_split(splits["train"].labels, val_size, seed)
        splits["train"], splits["val"] = splits["train"].subset(train_idx), splits["train"].subset(val_idx)
    return Dataset(f"folder:{info.path}", splits["train"], splits["val"], splits.get("test"), classes, asdict(info))


DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
}


def load_dataset(name: str, **options) -> Dataset:
    """Options: data_dir, val_size, seed; for synthetic also num_classes and train_size; for folders
    also skip_bad_images."""
    root = folder_path(name)
    if root is not None:
        return _folder(root, **options)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}, folder:PATH")
    return DATASETS[name](**options)
