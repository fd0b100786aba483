"""`--loader torch` for image folders: the loader contract (`pipelines.contract`) with files read on the
host and JPEGs decoded by `torchvision.io.decode_jpeg` on the device where it can (CUDA, nvJPEG, one
batched call per batch); every other image, and every image on the CPU, by `decode_image` on the host.

Decoders against PIL's `convert("RGB")` (what `ImageFolder`, the digests of `pipelines.folder` and the
torchvision loader see), measured on the CPU with torchvision 0.29: RGB, grey, CMYK (Adobe) and
progressive JPEGs, and RGB, grey, 1-bit, RGBA, LA and palette (with and without tRNS) PNGs decode to
identical pixels (alpha is dropped, not composited, by both). 16-bit PNGs differ: torchvision returns
uint16, PIL keeps the high byte of 16-bit RGB and clips 16-bit grey to 255 (a white image, but
ImageFolder's), so those, and anything torchvision cannot read, are decoded with PIL: every file reached
the loader through PIL (`load_folder`), so PIL reads it, and the loaders then agree.
On CUDA, nvJPEG gets only what it decodes: 8-bit Huffman JPEGs with 1 or 3 components (torchvision's
own CUDA decoding tests leave CMYK out); its IDCT and chroma upsampling are not libjpeg-turbo's, so its
pixels differ slightly from the host's (torchvision tests a mean difference under 2 levels).

Transforms, per image on the device with torchvision's functional ops on uint8 (on the CPU these are the
reference's own kernels, exact; on CUDA they run in float and round back): the evaluation view (shorter
side to `eval_resize`, centre crop) or the random-resized crop; then, batched, flip, `heavy`'s colour,
rotation and grey draws (the torch loader's ops) in [0, 1], normalisation, the fp16 cast, and the
memory format `spec.channels_last` asks for.

Threads: the decoders release the GIL, so `spec.num_threads` threads read and decode a batch's files;
a further thread prepares batch k + 1 (read, decode, crop, resize, stack) while batch k is in use, on
the consumer's CUDA stream (all but nvJPEG's decode, which gets a private stream: `decode_on_device`).
`num_threads` 0 does all of it in the consumer's thread, nothing ahead.

Randomness: a numpy generator seeded with `epoch_seed` draws the epoch order (its first draw is
`epoch_order`'s, so the order is the torchvision and DALI loaders') and then, batch by batch in the
consumer's thread, `DRAWS` uniforms for every image of the global batch; rank r keeps its rows. A fixed
number of draws per image, whatever its size, keeps the ranks' generators in step without knowing each
other's image sizes, so rank r's images get exactly the crops a single process with batch
`batch_size * world_size` would give them at that step, and thread counts change nothing.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from pipelines.contract import LoaderSpec, epoch_batches, epoch_seed, shard
from pipelines.folder import RRC_RATIO, RRC_SCALE, eval_resize, natural_augment, read_rgb
from pipelines.torch_loader import colour_and_rotation

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many (area, aspect) draws before its centre crop
# columns of the per-image uniform draw
_AREA = slice(0, ATTEMPTS)
_ASPECT = slice(ATTEMPTS, 2 * ATTEMPTS)
_TOP, _LEFT, _FLIP, _BRIGHT, _GREY = 2 * ATTEMPTS, 2 * ATTEMPTS + 1, 2 * ATTEMPTS + 2, 2 * ATTEMPTS + 3, 2 * ATTEMPTS + 8
# _BRIGHT.._GREY: brightness, contrast, saturation, hue, angle, grey (torch_loader.colour_and_rotation)
DRAWS = 2 * ATTEMPTS + 9

# frame (SOFn) markers of baseline, extended and progressive Huffman JPEGs: what nvJPEG decodes (the
# others: arithmetic coding, lossless, hierarchical)
_SOF_HUFFMAN = (0xC0, 0xC1, 0xC2)


def random_resized_crop(u: np.ndarray, heights, widths, scale=RRC_SCALE, ratio=RRC_RATIO) -> np.ndarray:
    """(top, left, height, width) per row, int64 N x 4: torchvision's `RandomResizedCrop` parameters
    (up to ten (area, aspect) draws, the first crop that fits the image, else its centre crop of the
    clamped aspect), vectorised over the images, from the uniforms `u` (N x DRAWS, in [0, 1))."""
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    area = (heights * widths)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, _ASPECT])
    # np.rint rounds half to even, as Python's round does
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    found, first = fits.any(axis=1), fits.argmax(axis=1)
    rows = np.arange(len(u))
    h, w = h[rows, first], w[rows, first]
    # the fallback: the whole image, or its centre with the aspect clamped into `ratio`
    in_ratio = widths / heights
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fh = np.where(narrow, np.rint(widths / min(ratio)).astype(np.int64), heights)
    fw = np.where(wide, np.rint(heights * max(ratio)).astype(np.int64), widths)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    # torch.randint(0, n) as floor(u * n); the min guards float rounding up to n
    top = np.minimum((u[:, _TOP] * (heights - h + 1)).astype(np.int64), heights - h)
    left = np.minimum((u[:, _LEFT] * (widths - w + 1)).astype(np.int64), widths - w)
    top = np.where(found, top, (heights - h) // 2)
    left = np.where(found, left, (widths - w) // 2)
    return np.stack([top, left, h, w], axis=1)


def device_decodable(data: torch.Tensor) -> bool:
    """Whether nvJPEG decodes this file's bytes: a JPEG whose frame header says 8-bit Huffman coding
    with 1 or 3 components. CMYK/YCCK (4 components), 12-bit, arithmetic-coded and lossless JPEGs, and
    everything that is not a JPEG, go to the host."""
    b = memoryview(data.numpy())
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return False
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return False  # not at a marker: malformed, let libjpeg-turbo report it
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            return marker in _SOF_HUFFMAN and b[i + 4] == 8 and b[i + 9] in (1, 3)
        if marker in (0xD9, 0xDA):  # end of image or a scan before any frame header
            return False
        i += 2 + (b[i + 2] << 8 | b[i + 3])
    return False


def decode_host(data: torch.Tensor, path: str) -> torch.Tensor:
    """3 x H x W uint8 RGB, decoded on the host the way PIL's `convert("RGB")` decodes it."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        image = None
    if image is None or image.dtype != torch.uint8:  # see the module docstring: 16-bit PNGs, odd files
        image = torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()
    return image


def decode_on_device(data: list[torch.Tensor], device: torch.device,
                     stream: torch.cuda.Stream | None) -> list[torch.Tensor]:
    """One batched `decode_jpeg` of JPEG bytes on `device`, its images ready for the current stream.

    torchvision allocates the images on the caller's current stream but has nvJPEG write them on a stream
    of its own, ordered after nothing on the caller's. On the consumer's stream the caching allocator may
    hand it memory that the previous batch freed while that batch's resize kernels, still queued on the
    consumer's stream, read it: nvJPEG overwrites their input (silent pixel corruption). So the images
    are allocated on `stream`, a private one, whose memory no consumer kernel is using; the consumer's
    stream waits for it; and every image is recorded on the consumer's stream, so that its memory is not
    handed out again (to the next decode) before the consumer's kernels that read it have run.
    `stream` None (the CPU) decodes on the one stream there is."""
    if stream is None:
        return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
    consumer = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        images = decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
    consumer.wait_stream(stream)
    for image in images:
        image.record_stream(consumer)
    return images


def _one_ahead(executor: Executor | None, fn: Callable, jobs: Iterable[tuple]) -> Iterator[tuple]:
    """(job, fn(*job)) for each job in order; with an executor, fn of the next job runs on it while the
    caller uses this one's result."""
    if executor is None:
        for job in jobs:
            yield job, fn(*job)
        return
    pending = None
    for job in jobs:
        future = executor.submit(fn, *job)
        if pending is not None:
            yield pending[0], pending[1].result()
        pending = (job, future)
    if pending is not None:
        yield pending[0], pending[1].result()


class TorchFolderLoader:
    """`--loader torch` for `--dataset folder:PATH`, as `pipelines.contract` and the module docstring
    describe. `spec.num_threads`: host threads that read and decode files (0: none, nothing ahead)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, spec: LoaderSpec):
        self.aug = natural_augment(spec.augment, spec.train)  # unknown names fail even for evaluation
        self.files = [os.fspath(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(self.files),):
            raise ValueError(f"{len(self.files)} files but labels of shape {self.labels.shape}")
        self.n = len(self.files)
        self.device = torch.device(spec.device)
        self.batch_size, self.train, self.seed = spec.batch_size, spec.train, spec.seed
        self.rank, self.world_size = spec.rank, spec.world_size
        self.image_size, self.resize = spec.image_size, eval_resize(spec.image_size)
        self.dtype = torch.float16 if spec.fp16 and self.device.type == "cuda" else torch.float32
        self.memory_format = spec.memory_format
        self.threads = max(0, int(spec.num_threads))
        self.jpeg_on_device = self.device.type == "cuda"  # nvJPEG; torchvision has no other device decoder
        self._decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._colour = self.aug.extras.colour_or_rotation
        self._len = epoch_batches(self.n, spec)
        self.epoch = 0  # epochs started so far: the next `for` loop uses this index

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.train:
            rng = np.random.default_rng(epoch_seed(self.seed, epoch))
            order = rng.permutation(self.n)  # epoch_order's draw, from the generator the crops then use
        else:
            rng, order = None, np.arange(self.n)
        order = shard(order, self.rank, self.world_size, even=self.train)
        # the prefetch thread queues its work on the consumer's stream, so it is ordered with the
        # consumer's (nvJPEG's decode aside: `decode_on_device` orders that)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        with contextlib.ExitStack() as stack:
            pool = ahead = None
            if self.threads:
                pool = stack.enter_context(ThreadPoolExecutor(self.threads, thread_name_prefix="folder-decode"))
                ahead = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="folder-ahead"))
            load = functools.partial(self._load, pool=pool, stream=stream)
            for (idx, u), images in _one_ahead(ahead, load, self._jobs(order, rng)):
                labels = torch.from_numpy(self.labels[idx]).to(self.device, non_blocking=True)
                yield self._finish(images, u), labels

    def _jobs(self, order: np.ndarray, rng: np.random.Generator | None) -> Iterator[tuple]:
        """(indices, uniforms or None) per batch, drawn lazily but always in batch order."""
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            u = None
            if rng is not None:
                # drawn for the global batch, so every rank's generator stays in step; this rank's rows
                u = shard(rng.random((len(idx) * self.world_size, DRAWS)), self.rank, self.world_size, even=True)
            yield idx, u

    def _read(self, path: str) -> torch.Tensor:
        """The file's bytes (1-D) when the device decodes it, else its pixels (3 x H x W)."""
        data = read_file(path)
        if self.jpeg_on_device and device_decodable(data):
            return data
        return decode_host(data, path)

    def _decode(self, paths: list[str], pool: Executor | None) -> list[torch.Tensor]:
        """3 x H x W uint8 RGB images on the device."""
        items = list(pool.map(self._read, paths) if pool is not None else map(self._read, paths))
        on_device = [i for i, item in enumerate(items) if item.ndim == 1]
        if on_device:
            try:
                decoded = decode_on_device([items[i] for i in on_device], self.device, self._decode_stream)
            except RuntimeError:  # nvJPEG failed the whole batch over a file libjpeg-turbo may read
                decoded = [decode_host(items[i], paths[i]) for i in on_device]
            for i, image in zip(on_device, decoded):
                items[i] = image
        return [item.to(self.device) for item in items]

    def _load(self, idx: np.ndarray, u: np.ndarray | None, pool: Executor | None, stream) -> torch.Tensor:
        """The batch's images decoded, cropped and resized: B x 3 x S x S uint8 on the device, in the
        loader's memory format."""
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            images = self._decode([self.files[i] for i in idx], pool)
            size = [self.image_size, self.image_size]
            if self.aug.random_crop:
                boxes = random_resized_crop(u, [x.shape[1] for x in images], [x.shape[2] for x in images])
                out = [TF.resized_crop(x, t, l, h, w, size, antialias=True)
                       for x, (t, l, h, w) in zip(images, boxes.tolist())]
            else:
                out = [TF.center_crop(TF.resize(x, [self.resize], antialias=True), size) for x in images]
            # the layout change on uint8: a quarter of the bytes of the float batch
            return torch.stack(out).contiguous(memory_format=self.memory_format)

    def _finish(self, x: torch.Tensor, u: np.ndarray | None) -> torch.Tensor:
        """Flip and colour draws on the stacked batch, normalised, cast, in the loader's memory format."""
        extras = self.aug.extras
        v = None if u is None else torch.from_numpy(u).to(self.device, torch.float32)
        if v is not None and extras.flip:  # on uint8: a quarter of the bytes
            x = torch.where((v[:, _FLIP] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
        x = x.float().div_(255.0)
        if v is not None and self._colour:
            x = colour_and_rotation(x, extras, v[:, _BRIGHT:_GREY + 1])
        x = x.sub_(self.mean).div_(self.std).to(self.dtype)
        return x.contiguous(memory_format=self.memory_format)
