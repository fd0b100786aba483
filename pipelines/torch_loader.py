"""`--loader torch`: the loader contract (`pipelines.contract`) with plain tensor ops on the device, for
machines without DALI.

The whole uint8 split is copied to `device` once (on CUDA: no image crosses PCIe after construction);
each batch is gathered there by index, augmented with batched tensor ops (per-sample random parameters,
no per-sample Python loop) at the native resolution, normalised, and only then resized to
`image_size`. The hue shift is a vectorised RGB -> HSV -> RGB because torchvision's `adjust_hue` takes
one float, not a tensor of factors. The colour jitter runs in the fixed order brightness, contrast,
saturation, hue (torchvision's ColorJitter draws a random order per image; the factors and their
ranges are the same).

Randomness: one `torch.Generator` on `device`, re-seeded every epoch with `epoch_seed`. CPU and CUDA
generators are different algorithms, so the same seed gives different (equally distributed) draws on
the two. Every rank draws the same permutation and (global batch x 9) parameters and keeps its rows,
so rank r's images and their augmentation are exactly the ones a single process with batch
`batch_size * world_size` would give the same images at the same step.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.augment import Augment, augment_spec
from pipelines.contract import LoaderSpec, epoch_batches, epoch_seed, shard

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights (torchvision: 0.2989, 0.587, 0.114)


# batched colour and geometry ops: x is (B, 3, H, W) float in [0, 1], factors are (B,) tensors

def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grey(x), factor)


# rgb channel c takes vpqt[_HUE_SELECT[c][i]] in hue sector i (0..5); vpqt = (v, p, q, t)
_HUE_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


@functools.lru_cache(maxsize=None)
def _hue_select(device: torch.device) -> torch.Tensor:
    """The table on `device`, built once: no per-batch host-to-device copy."""
    return torch.tensor(_HUE_SELECT, device=device)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotated by `shift` turns per sample, through HSV (torchvision's algorithm, batched)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = (h / 6.0 + shift.view(-1, 1, 1)).remainder(1.0)
    h6 = h * 6.0
    sector = h6.floor()
    f = h6 - sector
    v = maxc
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)                                    # B, 4, H, W
    select = _hue_select(x.device)                                               # 3, 6
    index = select[:, sector.long().remainder_(6)].permute(1, 0, 2, 3)           # B, 3, H, W
    return vpqt.gather(1, index)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (counter-clockwise), bilinear, zero fill."""
    a = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # output -> input sampling map in normalised coordinates (square pixels: H == W keeps it a rotation)
    h, w = x.shape[-2:]
    theta = torch.stack((torch.stack((cos, -sin * h / w, zero), 1),
                         torch.stack((sin * w / h, cos, zero), 1)), 1)                  # B, 2, 3
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask), grey(x).expand_as(x), x)


# columns of the per-batch uniform draw
_OY, _OX, _FLIP, _BRIGHT, _CONTRAST, _SAT, _HUE, _ANGLE, _GREY = range(9)


def _factor(u: torch.Tensor, spread: float) -> torch.Tensor:
    """Uniform on [max(0, 1 - spread), 1 + spread] (torchvision's ColorJitter range)."""
    lo = max(0.0, 1.0 - spread)
    return lo + (1.0 + spread - lo) * u


def colour_and_rotation(x: torch.Tensor, aug: Augment, u: torch.Tensor) -> torch.Tensor:
    """`aug`'s colour, rotation and grey draws on x (B, 3, H, W in [0, 1]), from the six columns of `u`
    (brightness, contrast, saturation, hue, angle, grey; uniform in [0, 1)); shared with the folder
    loader so that `heavy` means the same for both."""
    bright, contrast, sat, hue, angle, grey_draw = u.unbind(1)
    if aug.brightness:
        x = adjust_brightness(x, _factor(bright, aug.brightness))
    if aug.contrast:
        x = adjust_contrast(x, _factor(contrast, aug.contrast))
    if aug.saturation:
        x = adjust_saturation(x, _factor(sat, aug.saturation))
    if aug.hue:
        x = adjust_hue(x, (2.0 * hue - 1.0) * aug.hue)
    if aug.rotate:
        x = rotate(x, (2.0 * angle - 1.0) * aug.rotate)
    if aug.grayscale:
        x = to_grayscale(x, grey_draw < aug.grayscale)
    return x


class TorchLoader:
    """`--loader torch`, as `pipelines.contract` describes. `spec.num_threads` is ignored: every op runs
    asynchronously on the device's stream (on CUDA the Python loop only enqueues kernels), so there is
    nothing to prefetch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec):
        aug = augment_spec(spec.augment)  # unknown names fail even for evaluation
        self.aug: Augment = aug if spec.train else Augment()
        self.rank, self.world_size = spec.rank, spec.world_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be N x H x W x 3 uint8, got {images.dtype} {images.shape}")
        self.device = torch.device(spec.device)
        self.batch_size, self.train, self.seed = spec.batch_size, spec.train, spec.seed
        self.image_size = spec.image_size
        self.n, self.height, self.width = images.shape[0], images.shape[1], images.shape[2]
        self.dtype = torch.float16 if spec.fp16 and self.device.type == "cuda" else torch.float32
        self.memory_format = spec.memory_format
        pad = self.aug.pad
        data = torch.from_numpy(np.ascontiguousarray(images))
        if pad:  # pad the split once (zeros): every crop is then a plain gather, no per-batch padding
            data = F.pad(data, (0, 0, pad, pad, pad, pad))
        self.data = data.to(self.device)  # N x (H + 2 pad) x (W + 2 pad) x 3 uint8, on the device
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._rows = torch.arange(self.height, device=self.device)
        self._cols = torch.arange(self.width, device=self.device)
        self._colour = self.aug.colour_or_rotation
        self._random = self._colour or bool(self.aug.flip or pad)
        self._len = epoch_batches(self.n, spec)
        self.epoch = 0  # epochs started so far: the next `for` loop uses this index

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.seed, epoch))
        order = (torch.randperm(self.n, generator=gen, device=self.device) if self.train
                 else torch.arange(self.n, device=self.device))
        order = shard(order, self.rank, self.world_size, even=self.train)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self._batch(idx, gen), self.labels[idx]

    def _batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        aug, pad = self.aug, self.aug.pad
        if self._random:
            # drawn for the global batch, so every rank's generator stays in step; this rank's rows
            u = torch.rand((idx.shape[0] * self.world_size, 9), generator=gen, device=self.device)
            u = shard(u, self.rank, self.world_size, even=True)
        if aug.flip or pad:
            # one gather: sample, then a (row, column) grid shifted by the crop offset and mirrored
            rows, cols = self._rows, self._cols
            if pad:
                span = 2 * pad + 1
                oy = (u[:, _OY] * span).long().clamp_(max=span - 1)
                ox = (u[:, _OX] * span).long().clamp_(max=span - 1)
                rows = oy[:, None] + rows                                                 # B x H
                cols = ox[:, None] + cols                                                 # B x W
            else:
                rows, cols = rows.expand(idx.shape[0], -1), cols.expand(idx.shape[0], -1)
            if aug.flip:
                cols = torch.where((u[:, _FLIP] < 0.5)[:, None], cols.flip(1), cols)
            x = self.data[idx[:, None, None], rows[:, :, None], cols[:, None, :]]        # B x H x W x 3
        else:
            x = self.data[idx]
        # NHWC uint8 -> NCHW view (channels_last strides), laid out for the model while it is uint8 at the
        # source size (the cheapest copy, none for channels_last); the ops below keep the layout
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format).float().mul_(1.0 / 255.0)
        if self._colour:
            x = colour_and_rotation(x, aug, u[:, _BRIGHT:_GREY + 1])
        # normalising before the resize is exact (bilinear weights sum to 1) and 1/(S/32)^2 the work
        x = x.sub_(self.mean).div_(self.std)
        x = x.to(self.dtype)  # half before the resize: the large output is written once, in half
        if self.image_size != self.height or self.image_size != self.width:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=False)
        return x.contiguous(memory_format=self.memory_format)
