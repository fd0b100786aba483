"""Model FLOPs utilisation (MFU), the Lightning way, against a ceiling measured on the run's device.

    flops = train_flops_per_image(model, 224)           # the exact trainable configuration
    peak = matmul_ceiling_tflops(device)                # achieved dense bf16 matmul TFLOP/s here
    mfu(images_per_s, flops, peak)                      # fraction of that ceiling, 0..1

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (conv, matmul and attention kernels;
one multiply-add = 2 FLOPs; elementwise ops, BatchNorm and pooling are not counted), as Lightning's
`measure_flops` does. The count runs on a copy of the model on the "meta" device: shapes only, no
memory and no arithmetic, so it takes milliseconds and leaves the model untouched.

The ceiling is measured, not looked up: the datasheet peak is not reachable and differs between SKUs
and clocks, while a large square matmul shows what this device actually delivers.
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _shadow(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` in eval mode on `device`, with the same requires_grad flags.

    On "meta" no data is copied: deepcopy takes the pre-made meta tensors from its memo instead of
    cloning every weight (a resnet50 would otherwise cost 100 MB and a device-side copy).
    """
    if device.type == "meta":
        memo: dict = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        shadow = copy.deepcopy(model, memo)
    else:
        shadow = copy.deepcopy(model).to(device)
    # Eval: BatchNorm and dropout do not change the counted ops, and the copy's statistics stay put.
    return shadow.eval()


def _count(model: nn.Module, image_size: int, *, device, channels_last: bool, train: bool,
           batch: int, in_channels: int) -> int:
    device = torch.device(device)
    shadow = _shadow(model, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    shadow = shadow.to(memory_format=memory_format)
    x = torch.randn(batch, in_channels, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    with FlopCounterMode(display=False) as counter:
        if train:
            out = shadow(x)
            # The images need no gradient, so autograd already skips a frozen prefix's backward and a
            # frozen layer's weight gradient: the count is that of the real training step.
            if out.requires_grad:
                out.float().sum().backward()  # the loss's own backward is elementwise: not counted
        else:
            with torch.no_grad():
                shadow(x)
    return counter.get_total_flops() // batch


def train_flops_per_image(model: nn.Module, image_size: int, *, device="meta", channels_last: bool = True,
                          batch: int = 2, in_channels: int = 3) -> int:
    """FLOPs of one training step (forward + backward) per image, for the model's current
    requires_grad flags: frozen weights get no gradient, and a frozen prefix no backward at all.

    `device` is where the count runs: "meta" (default) computes nothing; pass a real device only for
    a model whose forward looks at values. The model itself is not changed (no grads, same BatchNorm
    statistics and modes). A model with nothing trainable costs its forward.
    """
    return _count(model, image_size, device=device, channels_last=channels_last, train=True,
                  batch=batch, in_channels=in_channels)


def eval_flops_per_image(model: nn.Module, image_size: int, *, device="meta", channels_last: bool = True,
                         batch: int = 2, in_channels: int = 3) -> int:
    """FLOPs of one forward pass per image (evaluation); see `train_flops_per_image`."""
    return _count(model, image_size, device=device, channels_last=channels_last, train=False,
                  batch=batch, in_channels=in_channels)


def matmul_ceiling_tflops(device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                          repeats: int = 10, warmup: int = 3) -> float:
    """Achieved TFLOP/s of an n x n @ n x n matmul on `device` (2 n^3 FLOPs), median of `repeats`.

    n defaults to 8192 on CUDA (large enough to saturate tensor cores on an H100) and 1024 on the CPU.
    A float32 ceiling on CUDA depends on `torch.backends.cuda.matmul.allow_tf32`: measure it with the
    setting the run trains with.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)  # random data: zeros would draw less power (and clock higher)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)  # preallocated: the allocator stays out of the timing
    for _ in range(warmup):  # cuBLAS heuristics, clocks ramping up, CPU thread pool start-up
        torch.mm(a, b, out=c)
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        with torch.cuda.device(device):
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(repeats)]
            for start, end in pairs:  # events in stream order: no host sync between repeats
                start.record()
                torch.mm(a, b, out=c)
                end.record()
            torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    else:
        for _ in range(repeats):  # CPU matmuls are synchronous: the wall clock is the kernel time
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def mfu(images_per_s: float | None, flops_per_image: float | None, ceiling_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the ceiling, as a fraction (0.4 = 40 %).
    None when any input is missing, not finite or not positive."""
    values = (images_per_s, flops_per_image, ceiling_tflops)
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return None
    return images_per_s * flops_per_image / (ceiling_tflops * 1e12)
