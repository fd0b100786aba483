"""`--loader torchvision`: the seeds' input pipeline, kept as the baseline to beat.

A `torch.utils.data.Dataset` over the uint8 arrays, `torchvision.transforms.v2` per sample on the CPU
(in `num_threads` DataLoader worker processes, or in the main process when 0), default collation,
pinned host memory on CUDA, then a host-to-device copy of every batch. Only the parts of the
`pipelines.augment.Augment` spec that are enabled are in the transform, in this order: RandomCrop
with zero padding, RandomHorizontalFlip, ColorJitter, RandomRotation (bilinear, zero fill),
RandomGrayscale (3 channels kept), Resize (bilinear, no antialias) when `image_size` differs, then
ToDtype(float32, scale) and Normalize. Geometry and colour run on uint8 at the native size, as the
seeds did.

Reproducibility: the sampler draws each epoch's permutation from a `torch.Generator` seeded from
(seed, epoch index), and hands the epoch index to the dataset with every sample index; the dataset
re-seeds torch's CPU generator from (seed, epoch, sample index) before transforming a sample
(torchvision's v2 transforms draw from that global generator). A sample's augmentation therefore
depends only on (seed, epoch, index), whatever the number of workers or how the batches are spread
over them. In the main process (num_threads=0) the caller's global RNG state is saved and restored
around each sample.

Sharding (`rank`, `world_size`): the sampler keeps rank `rank`'s part of every epoch's permutation
(`pipelines.loaders.shard`); a sample's augmentation still depends only on (seed, epoch, index).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from pipelines.augment import Augment, augment_spec
from pipelines.loaders import shard, shard_size

_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 64-bit seed from small integers (splitmix64 chained): cheap enough to run per sample."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h


def build_transform(aug: Augment, *, size: int, image_size: int, mean, std) -> v2.Compose:
    steps = []
    if aug.pad:
        steps.append(v2.RandomCrop(size, padding=aug.pad, fill=0))
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None,
                                    saturation=aug.saturation or None, hue=aug.hue or None))
    if aug.rotate:
        steps.append(v2.RandomRotation(aug.rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=0))
    if aug.grayscale:
        steps.append(v2.RandomGrayscale(p=aug.grayscale))  # keeps the input's 3 channels
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

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1)  # CHW uint8 view
        if not self.random:
            out = self.transform(image)
        elif get_worker_info() is not None:  # a worker's RNG is its own
            torch.default_generator.manual_seed(_mix(self.seed, epoch, index))
            out = self.transform(image)
        else:  # main process: leave the caller's global RNG as it was
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(_mix(self.seed, epoch, index))
            try:
                out = self.transform(image)
            finally:
                torch.set_rng_state(state)
        return out, int(self.labels[index])


class EpochSampler(Sampler):
    """Yields (index, epoch): a permutation seeded from (seed, epoch) when shuffling, else in order;
    with `world_size` > 1, rank `rank`'s shard of it (the remainder dropped when shuffling, i.e. training)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return shard_size(self.n, self.rank, self.world_size, even=self.shuffle)

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = range(self.n)
        order = shard(order, self.rank, self.world_size, even=self.shuffle)
        epoch = self.epoch
        return ((i, epoch) for i in order)


class TorchvisionLoader:
    """Iterates one epoch of (images, labels) per `for` loop: images NCHW channels_last, on `device`.

    `num_threads` is the number of DataLoader worker processes (0: transform in the main process);
    `prefetch` is the DataLoader's prefetch_factor (batches in flight per worker).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, train: bool,
                 image_size: int, mean, std, device: torch.device, augment: str = "flip-crop",
                 half: bool = False, seed: int = 0, num_threads: int = 2, prefetch: int = 2,
                 rank: int = 0, world_size: int = 1):
        spec = augment_spec(augment)  # unknown names fail even for evaluation
        aug = spec if train else Augment()  # evaluation never augments
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"
        self.batch_size, self.train, self.n = batch_size, train, len(labels)
        transform = build_transform(aug, size=images.shape[1], image_size=image_size, mean=mean, std=std)
        dataset = ArrayDataset(images, np.asarray(labels, dtype=np.int64), transform, seed=seed,
                               random=aug != Augment())
        self.sampler = EpochSampler(len(labels), shuffle=train, seed=seed, rank=rank, world_size=world_size)
        workers = max(0, int(num_threads))
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=max(1, prefetch) if workers > 0 else None,
            # only feeds the workers' base seeds (unused: samples are seeded by index); keeps the
            # DataLoader from drawing them from the caller's global RNG
            generator=torch.Generator().manual_seed(seed))
        self.epoch = 0  # epochs started so far: the next `for` loop uses this index

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        self.sampler.epoch, self.epoch = self.epoch, self.epoch + 1
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if self.half:
                x = x.half()
            yield x, y.to(self.device, non_blocking=True)
