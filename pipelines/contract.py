"""What every loader (`dali`, `torch`, `torchvision`) promises, and the pieces they share.

`Loader(images, labels, spec: LoaderSpec)`: `images` uint8 N x H x W x 3, `labels` int64 N (numpy).
`len(loader)` is the number of batches per epoch: `batch_count` of this rank's shard. Each `for`
loop is one epoch of (images, labels) on `spec.device`: images NCHW, with channels_last strides when
`spec.channels_last` (the default) and plain contiguous otherwise, so that the convolutions run in the
model's memory format (`--no-channels-last`) from the first one on; float32 (float16 when `spec.fp16`
and the device is CUDA), normalised with `spec.mean` and `spec.std`; labels int64. Training shuffles,
augments and drops the last partial batch (constant shapes for compiled steps, honest step times);
evaluation keeps the split's order, never augments and keeps the partial batch, so every image is
scored once.

Folder loaders (`--dataset folder:PATH`) keep the same contract with `Loader(files, labels, spec)`:
`files` a sequence of N image paths (JPEG or PNG, any size and mode, decoded to RGB), and the natural-
image transforms of `pipelines.folder` (`natural_augment`, `eval_resize`) in place of the array
loaders' resize of 32 px images.

Sharding (one process per device under torchrun): every rank draws the same epoch order and keeps
its part of it with `shard`, so the ranks read disjoint parts of the split, different ones every
epoch, with no communication. `batch_size` is per rank; the global batch is
`batch_size * world_size`.

Randomness: `epoch_seed` is the one map from (seed, epoch) to randomness. DALI and torchvision take
their epoch order from `epoch_order`, so they read the same images in the same order; torchvision
seeds each sample's transform with `sample_seed`. The torch loader seeds a `torch.Generator` on the
device with `epoch_seed` and draws its permutation and augmentation there (no host work per epoch),
so its order is a different permutation; DALI's per-sample augmentation draws come from its
pipeline's own seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


class DataError(Exception):
    """Bad or missing data; the message is one line meant for the user."""


@dataclass(frozen=True)
class LoaderSpec:
    batch_size: int
    train: bool
    image_size: int  # output side in px; images are resized from their native size when it differs
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    augment: str = "none"  # a name in pipelines.augment.AUGMENTS; evaluation ignores it
    # Images leave the loader as float16 when on CUDA (autocast casts them on for bf16 runs); always
    # float32 on the CPU.
    fp16: bool = False
    seed: int = 0
    num_threads: int = 2  # DALI's CPU threads, torchvision's DataLoader workers; the torch loader has none
    rank: int = 0
    world_size: int = 1
    # The batches' memory format, the model's (`--no-channels-last`): torch runs a convolution channels_last
    # when its input or its weight is, so a channels_last batch keeps a contiguous model in NHWC throughout.
    channels_last: bool = True

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def batch_count(n: int, batch_size: int, *, drop_last: bool) -> int:
    """Batches in an epoch of `n` images: training drops the last partial batch, evaluation keeps it."""
    return n // batch_size if drop_last else -(-n // batch_size)


def shard(order, rank: int, world_size: int, *, even: bool):
    """This rank's part of an epoch's `order` (a numpy array or tensor of indices): every
    `world_size`-th entry from `rank`, as torch's DistributedSampler takes them.

    Interleaving makes step i of every rank come from the same stretch `order[i*B:(i+1)*B]` (B the
    global batch), so the ranks' batches at one step are exactly the global batch a single process
    would take at that step. `even` (training) first drops the remainder, so every rank has the same
    number of images and steps (DDP ranks must run the same steps, or one waits forever);
    otherwise (evaluation) every entry is kept once: shards differ by at most one and cover `order`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    usable = len(order) // world_size * world_size if even else len(order)
    return order[rank:usable:world_size]


def shard_size(n: int, rank: int, world_size: int, *, even: bool) -> int:
    """len(shard(range(n), ...)) without building it."""
    return n // world_size if even else len(range(rank, n, world_size))


def epoch_batches(n: int, spec: LoaderSpec) -> int:
    """`len(loader)` for a split of `n` images sharded as `shard` shards it: the batches of rank
    `spec.rank`'s part of an epoch (training: the even shard, the partial batch dropped)."""
    return batch_count(shard_size(n, spec.rank, spec.world_size, even=spec.train), spec.batch_size,
                       drop_last=spec.train)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed that depends only on (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of an epoch: a permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)


_MASK = (1 << 64) - 1

# sample_seed runs once per image: the SeedSequence behind epoch_seed (several microseconds) once per epoch
_cached_epoch_seed = functools.lru_cache(maxsize=8)(epoch_seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for image `index` in epoch `epoch`: splitmix64 of (epoch_seed, index), cheap per image."""
    h = 0x9E3779B97F4A7C15
    for v in (_cached_epoch_seed(seed, epoch), index):
        h = (h ^ (v & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h
