"""Model FLOPs utilisation (MFU), the Lightning way, against a ceiling measured on the run's device.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (conv, matmul and attention kernels;
one multiply-add = 2 FLOPs; elementwise ops, BatchNorm and pooling are not counted), as Lightning's
`measure_flops` does, on a copy of the model on the "meta" device: shapes only, so it takes
milliseconds and leaves the model untouched. The ceiling is measured, not looked up: the datasheet
peak is not reachable and differs between SKUs and clocks.
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
    """A copy of `model` in eval mode on `device`, with the same requires_grad flags. On "meta" no data
    is copied: deepcopy takes the pre-made meta tensors from its memo instead of cloning every weight
    (a resnet50 would otherwise cost 100 MB and a device-side copy)."""
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
    statistics and modes). A model with nothing trainable costs its forward."""
    return _count(model, image_size, device=device, channels_last=channels_last, train=True,
                  batch=batch, in_channels=in_channels)


def eval_flops_per_image(model: nn.Module, image_size: int, *, device="meta", channels_last: bool = True,
                         batch: int = 2, in_channels: int = 3) -> int:
    """FLOPs of one forward pass per image (evaluation); see `train_flops_per_image`."""
    return _count(model, image_size, device=device, channels_last=channels_last, train=False,
                  batch=batch, in_channels=in_channels)


def matmul_ceiling_tflops(device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                          repeats: int = 10, warmup_s: float | None = None, tf32: bool | None = None) -> float:
    """Achieved TFLOP/s of an n x n @ n x n matmul on `device` (2 n^3 FLOPs), median of `repeats`.

    n defaults to 8192 on CUDA (large enough to saturate tensor cores on an H100), 1024 on the CPU (256 in fp16).
    Matmuls run for `warmup_s` seconds first (default 1 s on CUDA, where clocks and power settle over
    about that long; 0.1 s on the CPU, for the thread pool), at least 3 of them. A float32 ceiling on
    CUDA is a TF32 one when `tf32` is true: pass the setting the network's convolutions train with
    (`torch.backends.cudnn.allow_tf32`), or a strict-fp32 matmul would be compared with TF32 convolutions."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    # A CPU without native fp16 matmuls emulates them at about 1 GFLOP/s: 1024^2 would take 2 s a matmul.
    n = n or (8192 if cuda else 256 if dtype == torch.float16 else 1024)
    warmup_s = (1.0 if cuda else 0.1) if warmup_s is None else warmup_s
    saved = torch.backends.cuda.matmul.allow_tf32
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)  # random data: zeros would draw less power (and clock higher)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)  # preallocated: the allocator stays out of the timing
        warm_up(lambda: torch.mm(a, b, out=c), device, warmup_s)
        times = time_op(lambda: torch.mm(a, b, out=c), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def warm_up(op, device: torch.device, seconds: float, minimum: int = 3) -> None:
    """Run `op` for at least `seconds` of device time (and `minimum` times): cuBLAS heuristics, clocks
    ramping up, the CPU thread pool starting."""
    started, done = time.perf_counter(), 0
    while done < minimum or time.perf_counter() - started < seconds:
        for _ in range(minimum):
            op()
        done += minimum
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host clock must see the device's work, not its queue


def time_op(op, device: torch.device, repeats: int) -> list[float]:
    """Seconds per `op`, `repeats` times: CUDA events in stream order (no host sync between repeats),
    the wall clock on the CPU, where the op is synchronous."""
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        return times
    with torch.cuda.device(device):
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in pairs:
            start.record()
            op()
            end.record()
        torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def mfu(images_per_s: float | None, flops_per_image: float | None, ceiling_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the ceiling, as a fraction (0.4 = 40 %).
    None when any input is missing, not finite or not positive."""
    values = (images_per_s, flops_per_image, ceiling_tflops)
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return None
    return images_per_s * flops_per_image / (ceiling_tflops * 1e12)
