"""What a run learns as it starts, kept apart from what it was asked to do (`bench.settings`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.distributed import Dist


@dataclass(frozen=True)
class RunContext:
    device: torch.device
    dist: Dist = field(default_factory=Dist)
    parallel: str = "data"              # --parallel: how the ranks share the sweep under torchrun
    trace_dir: Path | None = None       # None: no profiler traces
    trace_steps: int = 3
    ceiling_tflops: float | None = None  # MFU's denominator, measured on this device

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size) of the group that trains one variant: every rank under --parallel data,
        this process alone otherwise."""
        if self.dist.world_size > 1 and self.parallel == "data":
            return self.dist.rank, self.dist.world_size
        return 0, 1

    @property
    def data_parallel(self) -> bool:
        return self.shard[1] > 1

    @property
    def devices_used(self) -> int:
        """Devices that train one variant: its GPU-hours count each."""
        return self.shard[1]

    @property
    def worker(self) -> str:
        """This rank's name in profiler traces (TensorBoard shows one worker per rank)."""
        return f"rank{self.dist.rank}"
