"""The three loaders behind one batch contract, chosen by `--loader`, imported only when chosen so a
machine without DALI can still run `--loader torch`.

Contract: `Loader(images, labels, *, batch_size, train, image_size, mean, std, device, augment, half,
seed, num_threads, rank, world_size)`; `len()` batches per epoch (training drops the last partial
batch); each `for` loop is one epoch of (images NCHW channels_last float on `device`, labels int64 on
`device`).

Sharding (`rank`, `world_size`; one process per device under torchrun): every rank draws the same
epoch order from (seed, epoch) and keeps its part of it with `shard` below, so each rank reads a
disjoint part of the split, a different one every epoch, with no communication. `batch_size` is per
rank; the global batch is `batch_size * world_size`.
"""
from __future__ import annotations

from pipelines.cifar import DataError

LOADERS = ("dali", "torch", "torchvision")


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


def loader_class(name: str) -> type:
    if name == "dali":
        try:
            from pipelines.dali import DaliLoader
        except ImportError as e:
            raise DataError(f"--loader dali: NVIDIA DALI cannot be imported ({e}); install "
                            f"nvidia-dali-cuda130, or use --loader torch") from None
        return DaliLoader
    if name == "torch":
        from pipelines.torch_loader import TorchLoader
        return TorchLoader
    if name == "torchvision":
        from pipelines.torchvision_loader import TorchvisionLoader
        return TorchvisionLoader
    raise DataError(f"unknown loader {name!r}; choose from: {', '.join(LOADERS)}")
