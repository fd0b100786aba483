"""`--loader torchvision` for `--dataset folder:PATH`: the baseline the others are measured against.

torchvision's reference recipe per sample in DataLoader workers: `ImageFolder`'s loader (PIL,
`convert("RGB")`), then `transforms.v2` on the uint8 tensor (random-resized crop or resize and centre
crop, flip, `heavy`'s colour, rotation and grey), pinned host memory on CUDA and a copy of every batch.
Order and per-sample seeding are the array loader's (`pipelines.torchvision_loader`): this loader and
the torch folder loader read the same order for the same seed (DALI's file reader has its own).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from pipelines.augment import Augment
from pipelines.contract import LoaderSpec
from pipelines.folder import RRC_RATIO, RRC_SCALE, NaturalAugment, eval_resize, natural_augment, read_rgb
from pipelines.torchvision_loader import ArrayDataset, TorchvisionLoader, flip_colour_rotation


def natural_transform(aug: NaturalAugment, *, image_size: int, mean, std) -> v2.Compose:
    if aug.random_crop:
        steps = [v2.RandomResizedCrop(image_size, scale=RRC_SCALE, ratio=RRC_RATIO, antialias=True)]
    else:
        steps = [v2.Resize(eval_resize(image_size), antialias=True), v2.CenterCrop(image_size)]
    steps += flip_colour_rotation(aug.extras)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class FolderDataset(ArrayDataset):
    """Image files instead of an array: decoded when a worker asks for them."""

    def image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_rgb(self.images[index])).permute(2, 0, 1)


class TorchvisionFolderLoader(TorchvisionLoader):
    """`pipelines.contract`'s folder loader; `spec.num_threads` DataLoader workers decode and transform."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, spec: LoaderSpec):
        aug = natural_augment(spec.augment, spec.train)
        transform = natural_transform(aug, image_size=spec.image_size, mean=spec.mean, std=spec.std)
        self._start(FolderDataset(np.asarray(files, dtype=object), np.asarray(labels, dtype=np.int64), transform,
                                  seed=spec.seed, random=aug != NaturalAugment(False, Augment())), spec)
