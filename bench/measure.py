"""Clocks, memory and the run's environment. Measurement returns plain numbers; rendering is elsewhere."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch


class StepTimer:
    """Marks the start and the end of every step. `intervals_ms()`: between consecutive starts (data
    wait included); `idle_ms()`: from one step's end to the next one's start, when the device had nothing
    of ours queued (on CUDA read from the device's timeline, so a host blocked on input shows as the GPU
    running dry). No host sync per step: on CUDA a mark is an event, read once at the end of the region;
    on the CPU, where work is synchronous, `perf_counter`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.ends: list = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        """A step starts (the input is in hand); the last call closes the last interval."""
        self.marks.append(self._now())

    def mark_end(self) -> None:
        """The step's work has been issued."""
        self.ends.append(self._now())

    def _elapsed_ms(self, pairs) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]

    def intervals_ms(self) -> list[float]:
        return self._elapsed_ms(list(zip(self.marks, self.marks[1:])))

    def idle_ms(self) -> list[float]:
        """One figure per interval that has an end mark (the step's end to the next step's start)."""
        return [max(0.0, ms) for ms in self._elapsed_ms(list(zip(self.ends, self.marks[1:])))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then peak_memory() reports the process-lifetime peak


def proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_used_bytes(device: torch.device) -> int | None:
    """Memory in use on the whole CUDA device (total - free, as the driver counts it), None on the CPU.
    torch's own peak cannot see DALI's memory, so rows of different loaders are compared on this."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class DevicePeak:
    """The largest `device_used_bytes` seen at the samples taken (the edges of timed regions: the driver
    keeps no peak for us, and a sample is a driver call, so it is taken a few times per epoch)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def sample(self) -> None:
        used = device_used_bytes(self.device)
        if used is not None:
            self.bytes = used if self.bytes is None else max(self.bytes, used)


def release_cached_memory(device: torch.device) -> None:
    """CUDA: the allocator's cached, unused blocks handed back to the driver (a synchronisation), so the
    device's memory in use counts what later steps reserve, not what earlier ones left cached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """torch's peak (`peak_memory`) and the whole device's (`DevicePeak`) in two windows: the warm-up,
    the run's first `warmup_steps` training steps, where cuDNN's autotuner tries the largest workspaces
    on each new shape and compilation runs, and the steady state after it, what training needs (`bytes`,
    `device_bytes`). With no warm-up there is one window, and the warm-up's figures are None.

    The allocator's cache is released one step before the warm-up ends (at its end when it is one
    step long): the device's steady figure then holds what a steady step reserves, not the autotuner's
    discarded workspaces, and the release's synchronisation and the re-reservation fall in an untimed step.
    """

    SAMPLED_STEPS = 3  # memory grows over a window's first steps (allocator, cuDNN workspaces, DALI's pools)

    def __init__(self, device: torch.device, warmup_steps: int = 0):
        self.device, self.warmup_steps = device, warmup_steps
        self.device_peak = DevicePeak(device)
        self.warmup_bytes: int | None = None
        self.warmup_device_bytes: int | None = None

    def start(self) -> None:
        """The first window opens (before the run's first step)."""
        reset_peak_memory(self.device)
        self.device_peak = DevicePeak(self.device)

    def step_done(self, step: int, *, early_in_epoch: bool = False) -> None:
        """Training step `step` of the run (counted from 1) has been issued; `early_in_epoch`: one of its
        epoch's first steps, sampled too."""
        if early_in_epoch or step <= self.warmup_steps + self.SAMPLED_STEPS:
            self.device_peak.sample()
        if step == self.warmup_steps:
            self._end_warmup()
        elif step == self.warmup_steps - 1:
            release_cached_memory(self.device)

    def _end_warmup(self) -> None:
        self.warmup_bytes, self.warmup_device_bytes = peak_memory(self.device), self.device_peak.bytes
        if self.warmup_steps == 1:  # no earlier untimed step to release the cache in
            release_cached_memory(self.device)
        self.start()

    def sample(self) -> None:
        """The device's memory in use, at the edge of a timed region."""
        self.device_peak.sample()

    @property
    def bytes(self) -> int:
        return peak_memory(self.device)

    @property
    def device_bytes(self) -> int | None:
        return self.device_peak.bytes


_IMPORTED = time.perf_counter()


def process_wall_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from Linux's
    /proc; elsewhere, since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: device memory allocated by torch on CUDA, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def environment(device: torch.device) -> dict:
    """Versions and device, recorded with every run."""
    import torchvision
    try:
        from nvidia import dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    cuda = device.type == "cuda"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": _driver_version() if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def measure_loader(loader, device: torch.device, *, max_batches: int = 50, warmup: int = 3) -> dict:
    """Steady-state images/s of iterating `loader` (first `warmup` batches left out). Each batch is
    reduced on the device so that lazy work really happens before the clock stops."""
    timer = StepTimer(device)
    sink = torch.zeros((), device=device)
    images, counted = 0, 0
    synchronize(device)
    for i, (x, y) in enumerate(loader):
        if i >= warmup + max_batches:
            break
        timer.mark()
        sink += x[:, :, 0, 0].float().sum() + y.sum()  # touches every batch without a host sync
        if i >= warmup:
            images, counted = images + y.shape[0], counted + 1
    timer.mark()
    synchronize(device)
    # Interval k runs from the mark after batch k to the mark after batch k + 1: the fetch of batch
    # k + 1. Batches warmup .. warmup + counted - 1 were counted, so their fetches are intervals
    # warmup - 1 .. warmup + counted - 2 (the interval after the last batch fetched nothing counted).
    intervals = timer.intervals_ms()[warmup - 1:warmup - 1 + counted]
    if not intervals:
        return {"loader_images_per_s": None, "loader_batch_ms_median": None, "loader_batches": 0}
    # The median batch, not the mean: the first batches of a process pay one-off costs (thread pools,
    # kernel selection) that would otherwise dominate a short measurement.
    return {"loader_images_per_s": round(images / counted / (median(intervals) / 1e3), 1),
            "loader_batch_ms_median": round(median(intervals), 3), "loader_batches": counted}
