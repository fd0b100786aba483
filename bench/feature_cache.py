"""Train the tail from cached trunk features: the frozen trunk runs once per image, not once per epoch.

With `--augment none` nothing random happens before the frozen trunk, so its output for an image is
the same every epoch. The features live on the device when they fit in part of its free memory (no
copy per batch), else in pinned host memory (one asynchronous copy per batch), else `CacheTooLarge`.
"""
from __future__ import annotations

import math
import os

import torch

from bench.measure import proc_bytes
from bench.train import autocast
from models.split import SplitModel
from pipelines.contract import batch_count, epoch_seed

# Share of the device's free memory the cache may take: the rest is for training the tail
# (activations, gradients, optimizer state) and the allocator's fragmentation.
DEVICE_FRACTION = 0.5
# Share of the host's available memory the cache may take (pinned pages cannot be swapped out).
HOST_FRACTION = 0.5

GiB = 1024 ** 3


class CacheTooLarge(RuntimeError):
    """The features do not fit within `max_bytes`, the device or the host; the message gives GiB."""


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _device_free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # Memory torch's caching allocator holds but does not use is free to torch, not to the driver.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _host_free_bytes() -> int | None:
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None  # unknown: trust max_bytes alone


class FeatureCache:
    """Trunk features of every image (in loader order) and their labels. Channels_last features are
    stored NHWC, so that a gathered batch is a contiguous block and its NCHW view is channels_last again."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                 feature_dtype: torch.dtype, channels_last: bool):
        self.features, self.labels, self.device = features, labels, device
        self.feature_dtype = feature_dtype  # what the trunk produced: batches are handed out in it
        self.channels_last = channels_last
        self.on_device = features.device.type == device.type

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, dtype: torch.dtype | None = None) -> CachedBatches:
        """An iterable of (features, labels) batches on the device, with the loaders' contract: `len()`
        batches; each `for` loop is one epoch, the first `epoch`, then epoch + 1, ...; the order of an
        epoch depends only on (seed, epoch). Features come in `dtype` (default: the trunk's own output
        dtype, so that the tail sees what the whole model would have fed it)."""
        return CachedBatches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                             dtype=dtype if dtype is not None else self.feature_dtype)


class CachedBatches:
    """See `FeatureCache.batches`."""

    def __init__(self, cache: FeatureCache, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, dtype: torch.dtype):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.epoch, self.drop_last, self.dtype = epoch, drop_last, dtype

    def __len__(self) -> int:
        n = len(self.cache)
        return batch_count(n, self.batch_size, drop_last=self.drop_last)

    def order(self, epoch: int) -> torch.Tensor:
        """The image indices of `epoch`, in batch order, on the device where the features live."""
        where = self.cache.features.device
        n = len(self.cache)
        if not self.shuffle:
            return torch.arange(n, device=where)
        # A generator on the features' device: the permutation is drawn there, no host round trip.
        gen = torch.Generator(device=where)
        gen.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(n, generator=gen, device=where)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        cache, device = self.cache, self.cache.device
        order = self.order(epoch)
        label_order = order.to(device, non_blocking=True)  # labels always live on the device
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if cache.on_device:
                x = cache.features.index_select(0, idx)
            else:
                # Gather on the host into pinned memory, then copy asynchronously; the caching host
                # allocator keeps the buffer alive until the copy has finished.
                staged = torch.empty((idx.shape[0], *cache.features.shape[1:]), dtype=cache.features.dtype,
                                     pin_memory=device.type == "cuda")
                torch.index_select(cache.features, 0, idx, out=staged)
                x = staged.to(device, non_blocking=True)
            if cache.channels_last:
                x = x.permute(0, 3, 1, 2)  # NHWC block -> NCHW view with channels_last strides
            yield x.to(self.dtype), cache.labels[label_order[i * self.batch_size:(i + 1) * self.batch_size]]


def _place(total: int, shape: tuple, dtype: torch.dtype, device: torch.device, max_bytes: int | None) -> str:
    """"device" or "host" for a cache of `total` bytes, or CacheTooLarge."""
    what = f"the feature cache needs {total / GiB:.3g} GiB ({shape[0]} images x {tuple(shape[1:])} {dtype})"
    if max_bytes is not None and total > max_bytes:
        raise CacheTooLarge(f"{what}, more than max_bytes = {max_bytes / GiB:.3g} GiB")
    if device.type == "cuda":
        free = _device_free_bytes(device)
        if total <= DEVICE_FRACTION * free:
            return "device"
    host = _host_free_bytes()
    if host is None or total <= HOST_FRACTION * host:
        return "host"
    where = f"{DEVICE_FRACTION:.0%} of the device's {free / GiB:.3g} GiB free and " if device.type == "cuda" else ""
    raise CacheTooLarge(f"{what}, more than {where}{HOST_FRACTION:.0%} of the host's {host / GiB:.3g} GiB available")


@torch.no_grad()
def build_cache(split_model: SplitModel, loader, *, device, dtype: torch.dtype = torch.bfloat16,
                max_bytes: int | None = None, precision: str = "fp32", num_images: int | None = None) -> FeatureCache:
    """Run `split_model`'s trunk over every batch of `loader` once and keep the features in `dtype`.

    `loader` must be evaluation-style: fixed order, no augmentation (anything random before the
    trunk would be frozen into the cache). `precision` autocasts the trunk as the trainer would.
    `num_images` (default: at most len(loader) x the first batch's size) sizes the storage.
    Raises CacheTooLarge before storing anything when the features do not fit."""
    device = torch.device(device)
    split_model.trunk.eval()  # shared with the original model, whose .train() may have flipped it
    features = labels = None
    filled = 0
    for images, batch_labels in loader:
        with autocast(device, precision):
            out = split_model.trunk_features(images)
        if features is None:  # the first batch fixes the shape, layout and where the cache lives
            channels_last = _channels_last(out)
            feature_dtype = out.dtype
            dense_shape = (out.shape[0], out.shape[2], out.shape[3], out.shape[1]) if channels_last else out.shape
            capacity = num_images or len(loader) * out.shape[0]
            shape = (capacity, *dense_shape[1:])
            total = math.prod(shape) * dtype.itemsize + capacity * 8  # features + int64 labels
            on_device = _place(total, (capacity, *out.shape[1:]), dtype, device, max_bytes) == "device"
            # Pinned host memory: the per-batch copies to the GPU can then be asynchronous.
            features = torch.empty(shape, dtype=dtype, device=device if on_device else "cpu",
                                   pin_memory=not on_device and device.type == "cuda")
            labels = torch.empty(capacity, dtype=torch.int64, device=device)
        if filled + out.shape[0] > features.shape[0]:
            raise ValueError(f"the loader yields more than num_images = {features.shape[0]} images")
        dense = out.permute(0, 2, 3, 1) if channels_last else out
        features[filled:filled + out.shape[0]].copy_(dense, non_blocking=True)
        labels[filled:filled + out.shape[0]].copy_(batch_labels.reshape(-1), non_blocking=True)
        filled += out.shape[0]
    if features is None:
        raise ValueError("the loader yielded no batches")
    if features.device.type == "cpu" and device.type == "cuda":
        torch.cuda.synchronize(device)  # device -> pinned host copies are asynchronous
    # Slices, not copies: at most one batch of capacity is left unused.
    return FeatureCache(features[:filled], labels[:filled], device=device, feature_dtype=feature_dtype,
                        channels_last=channels_last)
