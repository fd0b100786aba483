"""The environment step's own process (`python -m bench.suite --probe FILE`): versions, the device,
the bf16 matmul ceiling and the device-to-device copy bandwidth. Small sizes on the CPU."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from bench.files import atomic_write
from bench.flops import matmul_ceiling_tflops, time_op, warm_up


def nvidia_smi(query: str) -> str | None:
    """One field of the first GPU; None where there is no nvidia-smi or it fails."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    # DALI's distribution is named after its CUDA (nvidia-dali-cuda120, -cuda130): any of them.
    dali = next((d.version for d in metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": installed("torchvision"),
            "dali": dali, "timm": installed("timm"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "driver": nvidia_smi("driver_version"), "platform": platform.platform()}


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": platform.processor() or platform.machine(), "device_count": 1, "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "device_count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "cpu_count": os.cpu_count()}


def copy_gbps(device: torch.device, size: int, warmup_s: float, repeats: int = 20) -> float:
    """Median copy of `size` bytes in GB/s, counted as bytes read + written, as CUDA's bandwidthTest
    counts device to device."""
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    warm_up(lambda: dst.copy_(src), device, warmup_s)
    return 2 * size / statistics.median(time_op(lambda: dst.copy_(src), device, repeats)) / 1e9


def probe(path: Path, small: bool) -> int:
    device = torch.device("cpu" if small else "cuda")
    n, size, warmup_s = (512, 64 * 2**20, 0.2) if small else (8192, 2**30, 1.0)
    env = {**versions(), **device_info(device), "matmul_n": n, "copy_bytes": size}
    env["matmul_bf16_tflops"] = round(matmul_ceiling_tflops(device, torch.bfloat16, n=n, repeats=20,
                                                            warmup_s=warmup_s), 3)
    env["copy_gbps"] = round(copy_gbps(device, size, warmup_s), 1)
    atomic_write(path, json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    return 0
