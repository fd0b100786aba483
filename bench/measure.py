"""Clocks, memory and the run's environment. Measurement returns plain numbers; rendering is elsewhere.

The clock is chosen once per device: CUDA events on the GPU (recorded in stream order, read after one
synchronisation at the end of a timed region), `perf_counter` on the CPU, where work is synchronous.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch


class StepTimer:
    """Marks the start of every step; `intervals_ms()` gives the time between consecutive marks.

    No host synchronisation per step: on CUDA a mark is an event recorded on the current stream, and
    the elapsed times are read once, after `torch.cuda.synchronize()` at the end of the region.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if len(self.marks) < 2:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


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
