"""Test helper, started by torchrun from tests/test_distributed.py: what `bench.distributed.wrap_ddp`
does to BatchNorm buffers on two Gloo ranks, with this torch's DDP (`native`) and with a DDP that only
knows `broadcast_buffers`, as torch 2.11 does (`legacy`).

    torchrun --nproc_per_node=2 tests/ddp_buffers.py

Each rank starts with buffers of its own; after wrapping they must be rank 0's (the sync at
construction), and after a training-mode forward on each rank's own batch they must differ again (no
sync before the forward: `average_buffers` reconciles them before evaluation). Exits 1 naming what
went wrong.
"""
import inspect
import sys

import torch
import torch.distributed as dist
from torch import nn

from bench import distributed

NATIVE = nn.parallel.DistributedDataParallel


class LegacyDDP(NATIVE):
    """DDP as torch 2.11 spells it: `broadcast_buffers`, no `forward_sync_buffers`."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True, bucket_cap_mb=None,
                 find_unused_parameters=False, static_graph=False):
        super().__init__(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                         bucket_cap_mb=bucket_cap_mb, find_unused_parameters=find_unused_parameters,
                         static_graph=static_graph)


def check(ddp_class: type, rank: int) -> list[str]:
    nn.parallel.DistributedDataParallel = ddp_class
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(float(rank + 1))
    bn.num_batches_tracked.fill_(10 * (rank + 1))
    wrapped = distributed.wrap_ddp(model, torch.device("cpu"), compiled=False)
    problems = []
    if not (torch.all(bn.running_mean == 1.0) and int(bn.num_batches_tracked) == 10):
        problems.append(f"rank {rank}: buffers not rank 0's after wrapping: {bn.running_mean.tolist()}, "
                        f"{int(bn.num_batches_tracked)}")
    torch.manual_seed(100 + rank)  # each rank its own batch
    wrapped(torch.randn(8, 3, 8, 8) * (rank + 1)).sum().backward()
    means = [None, None]
    dist.all_gather_object(means, bn.running_mean.tolist())
    if means[0] == means[1]:
        problems.append(f"rank {rank}: buffers synced before the forward: {means}")
    return problems


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert "forward_sync_buffers" not in inspect.signature(LegacyDDP.__init__).parameters
    problems = [f"{name}: {p}" for name, cls in (("native", NATIVE), ("legacy", LegacyDDP))
                for p in check(cls, rank)]
    dist.destroy_process_group()
    for p in problems:
        print(p, flush=True)
    if not problems:
        print(f"rank {rank}: buffers ok", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
