"""`--loader torchvision`: the seeds' input pipeline, kept as the baseline to beat.

`torchvision.transforms.v2` per sample on the CPU in DataLoader workers, pinned host memory on CUDA,
then a host-to-device copy of every batch. Geometry and colour run on uint8 at the native size, as the
seeds did.

Reproducibility: each epoch's order is `epoch_order`'s (DALI's order too), and the dataset re-seeds
torch's global CPU generator, which the v2 transforms draw from, with `sample_seed(seed, epoch, index)`
before transforming a sample. A sample's augmentation therefore depends only on (seed, epoch, index),
whatever the number of workers, how the batches are spread over them, or which rank's shard it is in.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from pipelines.augment import Augment, augment_spec
from pipelines.contract import LoaderSpec, batch_count, epoch_order, sample_seed, shard, shard_size

PREFETCH_FACTOR = 2  # torch's default: each worker has its next batch ready while one is consumed


def flip_colour_rotation(aug: Augment) -> list:
    """`aug`'s flip, colour, rotation and grey steps (the array and folder transforms share them)."""
    steps = []
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None,
                                    saturation=aug.saturation or None, hue=aug.hue or None))
    if aug.rotate:
        steps.append(v2.RandomRotation(aug.rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=0))
    if aug.grayscale:
        steps.append(v2.RandomGrayscale(p=aug.grayscale))  # keeps the input's 3 channels
    return steps


def build_transform(aug: Augment, *, size: int, image_size: int, mean, std) -> v2.Compose:
    steps = [v2.RandomCrop(size, padding=aug.pad, fill=0)] if aug.pad else []
    steps += flip_colour_rotation(aug)
    if image_size != size:
        steps.append(v2.Resize(image_size, antialias=False))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class ArrayDataset(Dataset):
    """uint8 N x H x W x 3 images; items are keyed by (index, epoch) so augmentation can be seeded."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, *, seed: int, random: bool):
        self.images, self.labels, self.transform = images, labels, transform
        self.seed, self.random = seed, random

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1)  # CHW uint8 view

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image = self.image(index)
        if not self.random:
            out = self.transform(image)
        elif get_worker_info() is not None:  # a worker's RNG is its own
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            out = self.transform(image)
        else:  # main process: leave the caller's global RNG as it was
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            try:
                out = self.transform(image)
            finally:
                torch.set_rng_state(state)
        return out, int(self.labels[index])


class EpochSampler(Sampler):
    """Yields (index, epoch): `epoch_order` when shuffling (training), else in order; with
    `world_size` > 1, rank `rank`'s shard of it."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return shard_size(self.n, self.rank, self.world_size, even=self.shuffle)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch).tolist() if self.shuffle else range(self.n)
        order = shard(order, self.rank, self.world_size, even=self.shuffle)
        epoch = self.epoch
        return ((i, epoch) for i in order)


class TorchvisionLoader:
    """`--loader torchvision`, as `pipelines.contract` describes. `spec.num_threads` is the number of
    DataLoader worker processes (0: transform in the main process)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec):
        aug = augment_spec(spec.augment)  # unknown names fail even for evaluation
        if not spec.train:
            aug = Augment()
        transform = build_transform(aug, size=images.shape[1], image_size=spec.image_size, mean=spec.mean,
                                    std=spec.std)
        self._start(ArrayDataset(images, np.asarray(labels, dtype=np.int64), transform, seed=spec.seed,
                                 random=aug != Augment()), spec)

    def _start(self, dataset: ArrayDataset, spec: LoaderSpec) -> None:
        """The sampler and the DataLoader over `dataset` (the folder loader's too)."""
        self.device = torch.device(spec.device)
        self.fp16 = spec.fp16 and self.device.type == "cuda"
        self.memory_format = spec.memory_format
        self.batch_size, self.train, self.n = spec.batch_size, spec.train, len(dataset)
        self.sampler = EpochSampler(len(dataset), shuffle=spec.train, seed=spec.seed, rank=spec.rank,
                                    world_size=spec.world_size)
        workers = max(0, int(spec.num_threads))
        self.loader = DataLoader(
            dataset, batch_size=spec.batch_size, sampler=self.sampler, drop_last=spec.train, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
            # only feeds the workers' base seeds (unused: samples are seeded by index); keeps the
            # DataLoader from drawing them from the caller's global RNG
            generator=torch.Generator().manual_seed(spec.seed))
        self.epoch = 0  # epochs started so far: the next `for` loop uses this index

    def __len__(self) -> int:
        return batch_count(len(self.sampler), self.batch_size, drop_last=self.train)

    def __iter__(self):
        self.sampler.epoch, self.epoch = self.epoch, self.epoch + 1
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            if self.fp16:
                x = x.half()
            yield x, y.to(self.device, non_blocking=True)
