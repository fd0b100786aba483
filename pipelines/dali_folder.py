"""`--loader dali` for `--dataset folder:PATH`: DALI's file reader and decoders, as NVIDIA's ResNet-50
example feeds ImageNet.

`fn.readers.file` reads the files on DALI's own thread and DALI decodes them (nvJPEG, `mixed`, on CUDA;
libjpeg-turbo and its PNG decoder on the CPU), so no Python runs per image. The transforms are
`pipelines.folder`'s. Training with a random crop takes the random-resized crop (`RRC_SCALE`,
`RRC_RATIO`, 10 tries) in the decoder, `decoders.image_random_crop`, then resizes it to `image_size`
square: the decoder is handed the window and can skip the rest of the image (DALI's region-of-interest
decoding), which `fn.random_resized_crop` after a full decode cannot; that is why NVIDIA's example does
it so. Everything else resizes the shorter side to `eval_resize(image_size)` and centre-crops, with
torchvision's output size and crop offset to the pixel (`_eval_view`). Resizing is DALI's default,
linear and antialiased when shrinking: the filter of torchvision's `Resize(antialias=True)`. On the CPU
evaluation then matches torchvision's reference to within a grey level (tests/test_dali_folder.py).

Where it departs from the array loaders (`pipelines.contract`): the epoch order is the reader's own
shuffle (`shuffle_after_epoch`, seeded with `spec.seed`, the same on every rank), not `epoch_order`, so
it is a different permutation from the torchvision loader's; and the reader shards every epoch's order
into contiguous blocks (`shard_range`), not `shard`'s interleaving. What the contract needs still holds:
every rank takes the same number of training steps on disjoint images, evaluation shards together cover
the split once, and a single process evaluates in the order of `files`.

DALI 2 decodes through nvImageCodec, which it opens only when a pipeline with a decoder is built, so a
DALI without it imports and runs the array loader and then fails here at the build, with a page of C++
context. `decoder_problem` builds and runs the smallest such pipeline once per process and decoder;
the loader turns its answer into one `DataError` line.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from pipelines.contract import DataError, LoaderSpec, batch_count, epoch_batches
from pipelines.dali import PREFETCH_QUEUE_DEPTH, as_nchw, colour_and_rotation, output_layout, rank_seed
from pipelines.folder import RRC_RATIO, RRC_SCALE, NaturalAugment, eval_resize, natural_augment

READER = "Reader"
# nvJPEG's buffers sized up front for ImageNet's largest image, as NVIDIA's example does, so the first
# epochs do not reallocate (and synchronise) whenever a larger image than any before comes along.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def _tiny_jpeg() -> np.ndarray:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "JPEG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


@pipeline_def
def _decoder_probe(jpeg: np.ndarray, *, decoder: str):
    """Every decoding operator of `folder_pipeline`, on one tiny JPEG."""
    jpegs = fn.external_source(source=lambda: [jpeg], batch=True)
    return (fn.decoders.image(jpegs, device=decoder, output_type=types.RGB),
            fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB),
            fn.peek_image_shape(jpegs))


def _dali_cause(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong: DALI puts the operator and the pipeline
    definition's traceback first and the cause after `encountered:`."""
    text = str(error)
    _, marker, cause = text.partition("encountered:")
    lines = [line.strip() for line in (cause if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@functools.cache
def decoder_problem(decoder: str, device_id: int | None) -> str | None:
    """None when DALI's image decoders run on `decoder` ("cpu", or "mixed": nvJPEG on GPU `device_id`),
    else why not, in one line (the module docstring says why a probe: nvImageCodec). Once per process."""
    try:
        pipe = _decoder_probe(_tiny_jpeg(), decoder=decoder, batch_size=1, num_threads=1, device_id=device_id)
        pipe.build()
        pipe.run()
    except RuntimeError as e:
        return _dali_cause(e)
    return None


def decoder_on(device: torch.device) -> tuple[str, int | None]:
    """DALI's decoder backend and device_id for `device`: nvJPEG (`mixed`) on CUDA, else the CPU's."""
    if device.type != "cuda":
        return "cpu", None
    return "mixed", torch.cuda.current_device() if device.index is None else device.index


def check_decoder(device: torch.device) -> None:
    """`decoder_problem` on `device` as the user's one-line DataError."""
    decoder, device_id = decoder_on(device)
    problem = decoder_problem(decoder, device_id)
    if problem is not None:
        where = "nvJPEG on the GPU, DALI's 'mixed'" if decoder == "mixed" else "on the CPU"
        raise DataError(f"--loader dali: DALI's image decoder ({where}) does not run here; use --loader torch, "
                        f"or repair DALI: {problem}")


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the reader's shard `rank` of an epoch's n images: DALI's contiguous blocks."""
    return rank * n // world_size, (rank + 1) * n // world_size


def _centre_offset(excess):
    """`crop_pos` for torchvision's centre-crop offset int(round(excess / 2)), which rounds halves to even
    (DALI's own rounds them up: a pixel off for half the odd excesses). Normalised positions because
    that is what DALI's crops take: +0.5 and truncation land exactly on the integer offset, and the
    max keeps an image already at the crop size (excess 0) away from 0 / 0."""
    half = excess // 2
    offset = half + (excess - 2 * half) * (half - 2 * (half // 2))  # half + 1 when excess is odd and half is odd
    return (offset + 0.5) / dmath.max(excess, 1)


def _eval_view(images, shape, size: int):
    """Shorter side to eval_resize(size), then the size x size centre crop, with torchvision's geometry to
    the pixel: its longer side is int(resize * long / short), where DALI's `resize_shorter` rounds it and
    keeps the exact scale, a different picture (found by the agreement test). Returns the resized images
    and the crop arguments for crop_mirror_normalize (or fn.crop)."""
    h, w = shape[0], shape[1]
    short, resize = dmath.min(h, w), eval_resize(size)
    new_h, new_w = h * resize // short, w * resize // short  # integer floor: int() of the exact ratio
    images = fn.resize(images, resize_y=fn.cast(new_h, dtype=types.FLOAT), resize_x=fn.cast(new_w, dtype=types.FLOAT))
    return images, dict(crop=(size, size), crop_pos_y=_centre_offset(new_h - size),
                        crop_pos_x=_centre_offset(new_w - size), rounding="truncate")


@pipeline_def
def folder_pipeline(files: list[str], labels: list[int], *, decoder: str, aug: NaturalAugment, train: bool,
                    shard_id: int, num_shards: int, shuffle_seed: int, image_size: int, mean, std, dtype,
                    layout: str):
    # pad_last_batch: every shard's epoch ends in its own (padded) batch instead of running on into the
    # next epoch's images, so epochs stay whole; DaliFolderLoader.__iter__ discards the padding batches.
    # stick_to_shard (evaluation; shuffle_after_epoch implies it): without it a rank moves to the next
    # shard every epoch, and its batch count with it.
    jpegs, labels = fn.readers.file(
        files=files, labels=labels, shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
        shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=True, name=READER,
        **({"shuffle_after_epoch_seed": shuffle_seed} if train else {}))
    on_gpu = decoder == "mixed"
    # EXIF orientation ignored, as PIL's convert("RGB") in ImageFolder's loader (and folder.py's digests) do
    decode = dict(device=decoder, output_type=types.RGB, adjust_orientation=False)
    if on_gpu:
        decode.update(device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING)
    extras = aug.extras
    if aug.random_crop:
        images = fn.decoders.image_random_crop(jpegs, random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO),
                                               num_attempts=10, **decode)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        crop = {}
    else:
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # from the header, before decoding
        images, crop = _eval_view(fn.decoders.image(jpegs, **decode), shape, image_size)
    if extras.colour_or_rotation:  # at the output size, as the other loaders do it
        if crop:
            images, crop = fn.crop(images, **crop), {}
        images = colour_and_rotation(images, extras)
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip() if extras.flip else 0, dtype=dtype, output_layout=layout,
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], **crop)
    labels = fn.cast(labels, dtype=types.INT64)
    return images, labels.gpu() if on_gpu else labels


class DaliFolderLoader:
    """The folder loader of `pipelines.contract` on DALI (the module docstring says where its order and
    shards differ from the array loaders'). Images leave DALI in `output_layout`, as NCHW without a copy,
    as in `pipelines.dali.DaliLoader`.

    Step counts. The reader's shards differ by one image when world_size does not divide n, and with
    `pad_last_batch` every shard's epoch is padded to as many batches as the largest shard needs. DALI's
    DROP policy does end every rank's epoch after (n // world_size) // batch_size batches, but when that
    uses up the smaller shard exactly it stops without reading the rest of the reader's epoch, so the
    next epoch begins with the previous one's leftover batch (measured: 21 images, batches of 5, two
    ranks: both ranks' second epoch began with a batch of one image five times over, the padding). So
    the iterator runs with PARTIAL, which reads exactly the reader's epoch every time, and `__iter__`
    hands out only `len(self)` batches: in training the first (n // world_size) // batch_size, full of
    real images on every rank; in evaluation those of its own shard (PARTIAL trims the padding from the
    last). The rest of the reader's epoch (at most two batches: the partial one and one of pure
    padding) is decoded and dropped.
    """

    # so that a caller can find a machine without DALI's decoders before it writes anything
    check_device = staticmethod(check_decoder)

    def __init__(self, files: Sequence[str], labels: np.ndarray, spec: LoaderSpec):
        n = len(files)
        if len(labels) != n:
            raise ValueError(f"{n} files but {len(labels)} labels")
        if n < max(1, spec.world_size):  # DALI's reader cannot serve an empty shard
            raise DataError(f"{n} images for {spec.world_size} rank(s): every rank needs at least one")
        aug = natural_augment(spec.augment, spec.train)
        self.check_device(spec.device)  # one line for the user, not the pipeline build's traceback
        decoder, device_id = decoder_on(spec.device)
        on_gpu = decoder == "mixed"
        start, end = shard_range(n, spec.rank, spec.world_size)
        # training: the contract's even shard, the same on every rank so that DDP ranks step together;
        # evaluation: the reader's own shard, every image of it
        self._len = (epoch_batches(n, spec) if spec.train
                     else batch_count(end - start, spec.batch_size, drop_last=False))
        self.layout = output_layout(spec.channels_last)
        pipe = folder_pipeline(
            [str(f) for f in files], [int(y) for y in labels], decoder=decoder, aug=aug,
            train=spec.train, shard_id=spec.rank, num_shards=spec.world_size,
            # the reader's shuffle must be the same on every rank, or the shards would overlap
            shuffle_seed=int(spec.seed), image_size=spec.image_size, mean=spec.mean, std=spec.std,
            dtype=types.FLOAT16 if spec.fp16 and on_gpu else types.FLOAT, layout=self.layout,
            batch_size=spec.batch_size, num_threads=max(1, spec.num_threads), device_id=device_id,
            seed=rank_seed(spec.seed, spec.rank, spec.world_size), prefetch_queue_depth=PREFETCH_QUEUE_DEPTH)
        # auto_reset: after the reader's epoch the iterator is ready for the next one
        self._iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self._mid_epoch = False

    def __len__(self) -> int:
        return self._len

    def _finish_epoch(self) -> None:
        """Runs the reader's epoch to its end. next(), not a for loop: iter() on a DALI iterator in
        mid-epoch warns and carries on rather than resetting."""
        while self._mid_epoch:
            try:
                next(self._iterator)
            except StopIteration:
                self._mid_epoch = False

    def __iter__(self):
        # a loop broken off early leaves the reader mid-epoch: this epoch must start at the next one
        self._finish_epoch()
        self._mid_epoch = True
        for _ in range(self._len):
            batch = next(self._iterator)[0]
            yield as_nchw(batch["images"], self.layout), batch["labels"].view(-1)
        self._finish_epoch()
