"""DALI pipelines: uint8 HWC batches in, normalised NCHW batches out (channels_last or contiguous).

One pipeline definition serves both devices. On CUDA the whole uint8 split lives in GPU memory and
`fn.external_source` gathers each batch there, so no image crosses PCIe during training; on the CPU
(`device_id=None`) the same graph runs on DALI's CPU operators.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipelines.augment import Augment, augment_spec
from pipelines.contract import LoaderSpec, batch_count, epoch_order, shard, shard_size

PREFETCH_QUEUE_DEPTH = 2  # DALI's default: the next batches are prepared while the model trains on this one


class EpochSource:
    """`external_source` callback: one batch of (images, labels) per call, shuffled per epoch.

    DALI calls it with `BatchInfo`; the permutation depends only on (seed, epoch) (`epoch_order`),
    because DALI's prefetching asks for the next epoch's first batches before the current epoch has
    been consumed. Raising StopIteration ends the epoch. With `world_size` > 1 the source serves rank
    `rank`'s shard of every epoch's order.

    On the GPU the gather runs on a stream of its own (`stream`, which DALI also copies on): on torch's
    current stream it would queue behind the training step in flight, so DALI could not prepare the next
    batch while the model trains, and the training loop would wait for its own previous step.
    """

    def __init__(self, images, labels, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels
        on_gpu = isinstance(images, torch.Tensor) and images.is_cuda
        self.stream = torch.cuda.Stream(device=images.device) if on_gpu else None
        if on_gpu:  # the split's upload was queued on the current stream: gathers must come after it
            self.stream.wait_stream(torch.cuda.current_stream(images.device))
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank, self.world_size, self.total = rank, world_size, len(labels)
        self.n = shard_size(self.total, rank, world_size, even=drop_last)
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, drop_last=self.drop_last)

    def _order_for(self, epoch: int):
        if epoch != self._epoch:
            order = epoch_order(self.total, self.seed, epoch) if self.shuffle else np.arange(self.total)
            order = shard(order, self.rank, self.world_size, even=self.drop_last)
            if isinstance(self.images, torch.Tensor):
                order = torch.from_numpy(order).to(self.images.device)
            self._epoch, self._order = epoch, order
        return self._order

    def __call__(self, info):
        if info.iteration >= len(self):
            raise StopIteration
        start = info.iteration * self.batch_size
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            idx = self._order_for(info.epoch_idx)[start:start + self.batch_size]
            # Freed blocks return to this stream's pool, reused only after DALI's copy on it is done.
            return self.images[idx], self.labels[idx]


def _uniform(spread: float, centre: float = 0.0):
    """A per-sample draw from [centre - spread, centre + spread]; the constant itself when spread is 0."""
    return fn.random.uniform(range=(centre - spread, centre + spread)) if spread else centre


def colour_and_rotation(images, aug: Augment):
    """`aug`'s colour, grey and rotation draws (pipelines.augment) on HWC uint8 images; the array and
    folder pipelines share them so that `heavy` means the same whichever one runs. Flip stays in the
    callers' crop_mirror_normalize, where it costs nothing."""
    if aug.brightness or aug.contrast or aug.saturation or aug.hue or aug.grayscale:
        saturation = _uniform(aug.saturation, 1.0)
        if aug.grayscale:  # saturation 0 keeps only luma (Y of YIQ): torchvision's grayscale weights
            grey = fn.random.coin_flip(probability=aug.grayscale, dtype=types.INT32)
            saturation = saturation * fn.cast(1 - grey, dtype=types.FLOAT)
        images = fn.color_twist(images, brightness=_uniform(aug.brightness, 1.0),
                                contrast=_uniform(aug.contrast, 1.0), saturation=saturation,
                                hue=_uniform(aug.hue * 360.0))  # DALI's hue is in degrees
        # (DALI's contrast pivots on mid-grey and its hue turns in YIQ, where the torch loaders pivot on
        # the image mean and turn in HSV: statistically the same at the heavy preset's strengths.)
    if aug.rotate:
        images = fn.rotate(images, angle=_uniform(aug.rotate), keep_size=True, fill_value=0)
    return images


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """The pipeline's op seed. The order is shared by all ranks; DALI's per-sample random draws must not
    be, or every rank would crop and flip its i-th image exactly as the others do."""
    return seed if world_size == 1 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)


def output_layout(channels_last: bool) -> str:
    """crop_mirror_normalize's output layout for a batch of that memory format: HWC, whose NCHW permute
    is a view with channels_last strides, or CHW, plain NCHW written by the operator itself. Either way
    no copy follows DALI's."""
    return "HWC" if channels_last else "CHW"


def as_nchw(images: torch.Tensor, layout: str) -> torch.Tensor:
    """A batch of `output_layout`'s `layout` as NCHW, without a copy."""
    return images.permute(0, 3, 1, 2) if layout == "HWC" else images


@pipeline_def
def image_pipeline(source, *, device: str, aug: Augment, image_size: int, source_size: int, mean, std, dtype,
                   layout: str):
    """`aug` as pipelines.augment documents it, at the source resolution, then resize and normalise."""
    # GPU batches come as torch tensors gathered on the source's own stream: DALI copies them there,
    # in order after the gather and independent of the training step on torch's current stream.
    images, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                        device=device, layout=["HWC", ""], cuda_stream=source.stream)
    if aug.pad:  # random crop of the original size from the zero-padded image
        anchor = fn.random.uniform(values=list(range(-aug.pad, aug.pad + 1)), shape=[2], dtype=types.INT32)
        images = fn.slice(images, start=anchor, shape=[source_size, source_size], axis_names="HW",
                          out_of_bounds_policy="pad", fill_values=0)
    images = colour_and_rotation(images, aug)
    if image_size != source_size:
        images = fn.resize(images, size=[image_size, image_size])
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip() if aug.flip else 0, dtype=dtype, output_layout=layout,
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
    return images, labels


class DaliLoader:
    """`--loader dali`, as `pipelines.contract` describes.

    For channels_last DALI hands back HWC tensors, and permuting them to NCHW is a view whose strides are
    exactly channels_last; otherwise its normalisation writes CHW. The network gets the layout it asked
    for without a copy.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec):
        aug = augment_spec(spec.augment)
        if not spec.train:
            aug = augment_spec("none")  # evaluation never augments
        device, seed, rank, world_size = spec.device, spec.seed, spec.rank, spec.world_size
        on_gpu = device.type == "cuda"
        if on_gpu:  # the whole uint8 split on the GPU once: CIFAR's 50k images are 150 MB
            images = torch.from_numpy(images).to(device)
            labels = torch.from_numpy(labels).to(device)
        self.source = EpochSource(images, labels, spec.batch_size, shuffle=spec.train, drop_last=spec.train,
                                  seed=seed, rank=rank, world_size=world_size)
        op_seed = rank_seed(seed, rank, world_size)
        self.layout = output_layout(spec.channels_last)
        pipe = image_pipeline(
            self.source, device="gpu" if on_gpu else "cpu", aug=aug, image_size=spec.image_size,
            source_size=images.shape[1], mean=spec.mean, std=spec.std,
            dtype=types.FLOAT16 if spec.fp16 and on_gpu else types.FLOAT,
            batch_size=spec.batch_size, num_threads=max(1, spec.num_threads),
            device_id=(torch.cuda.current_device() if device.index is None else device.index) if on_gpu else None,
            layout=self.layout, seed=op_seed, prefetch_queue_depth=PREFETCH_QUEUE_DEPTH)
        # auto_reset: the next `for` loop starts the next epoch.
        self._iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=True)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        for out in self._iterator:
            batch = out[0]
            yield as_nchw(batch["images"], self.layout), batch["labels"]
