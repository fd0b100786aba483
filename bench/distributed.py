"""One process per device under `torchrun`: rank and world size, the process group, the few collectives
the harness needs, and the DDP wrapper. Without torchrun every function here is a no-op, so the
single-device path pays nothing. The only module that reads torchrun's environment; the harness never
launches processes itself, and torchrun's elastic agent stops every rank when one exits with an error.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bench.errors import ConfigError

PARALLEL = ("data", "variants")
LR_SCALES = ("none", "linear", "sqrt")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job. `world_size` 1: no process group, no collectives."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes the results, plots and checkpoints."""
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        """Local rank 0: downloads once per node before the node's other ranks read the cache."""
        return self.local_rank == 0



def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def from_env() -> Dist:
    """The position torchrun gave this process; (0, 1) when started without it. No process group yet."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                          f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    return Dist(rank, world, local_rank, local_world)


def rank_device(d: Dist, device: torch.device) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` (made current, so NCCL, DALI and every `.cuda()` use it),
    or the CPU, which all ranks of a node share."""
    if device.type != "cuda" or d.world_size == 1:
        return device
    visible = torch.cuda.device_count()
    if d.local_rank >= visible:
        raise ConfigError(f"torchrun started {d.local_world_size} processes on this node but only {visible} "
                          f"CUDA devices are visible; use --nproc_per_node={visible} or fewer")
    torch.cuda.set_device(d.local_rank)
    return torch.device("cuda", d.local_rank)


def init(d: Dist, device: torch.device, timeout_s: float) -> None:
    """The process group from torchrun's environment. `timeout_s` bounds how long a collective waits for
    a rank that is alive but stuck; a rank that dies is noticed sooner: its peers' sockets close, and
    torchrun stops the others (SIGTERM)."""
    if d.world_size == 1 or dist.is_initialized():
        return
    cuda = device.type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            # NCCL: bind the communicator to this rank's device at once
                            **({"device_id": device} if cuda else {}))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# collectives: no-ops on one process

def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (`sum` or `max`); returns `tensor`."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank that has a message, the same on every rank; None if none has.
    The agreement point for errors found before training: every rank then stops the same way."""
    for rank, m in enumerate(all_gather_objects(message)):
        if m is not None:
            return rank, m
    return None


def store() -> dist.Store | None:
    """The key-value store of torchrun's rendezvous (a TCP client of it), shared by all ranks; None
    without a process group. Keys are prefixed with the restart count, so a restarted job starts afresh."""
    if not active():
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=300))
    return dist.PrefixStore(f"finetune-bench/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", client)


def record_failure(error: BaseException) -> None:
    """Under torchrun: this rank's exception into the agent's error file, so torchrun's summary names
    the failing rank with its message. Call it inside the `except` block (it reads the traceback)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(error)


def scaled_lr(lr: float, scale: str, world_size: int) -> float:
    """`--lr-scale-world`: the learning rate for the global batch (per-rank batch x world size), scaled
    linearly (Goyal et al., 2017) or by the square root."""
    if world_size == 1 or scale == "none":
        return lr
    return lr * (world_size if scale == "linear" else math.sqrt(world_size))


# DDP over the trainable part

def bucket_cap_mb(trainable_bytes: int) -> float:
    """DDP's gradient bucket size for a trainable tail of `trainable_bytes`: about four buckets, so the
    all-reduce of the last layers' gradients overlaps the backward of earlier ones; never above DDP's
    default 25 MB (enough to saturate the link), never below 1 MB (each bucket is a launch)."""
    return round(min(25.0, max(1.0, trainable_bytes / 4 / 2**20)), 2)


def wrap_ddp(model: nn.Module, device: torch.device, *, compiled: bool) -> nn.Module:
    """`model` under DistributedDataParallel. Frozen parameters get no bucket and no hook, so no
    unused-parameter search is needed. `static_graph` (the same parameters every step, which holds for
    a fixed freeze plan) skips per-step bookkeeping; it is off when compiled, because dynamo's
    DDPOptimizer, which splits the compiled graph at bucket boundaries, is not documented to support it
    (pytorch#93672, #109261). Buffers are synced at construction, not before every forward (that would
    be a collective inside evaluation, where ranks may run different numbers of batches);
    `average_buffers` reconciles them before each evaluation instead."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ddp_class = nn.parallel.DistributedDataParallel
    wrapped = ddp_class(model, device_ids=[device.index] if device.type == "cuda" else None,
                        bucket_cap_mb=bucket_cap_mb(trainable), find_unused_parameters=False,
                        static_graph=not compiled, **no_forward_buffer_sync(ddp_class))
    if not _has_forward_sync_buffers(ddp_class):
        broadcast_buffers_(model)  # `broadcast_buffers=False` also skipped the sync at construction
    return wrapped


def _has_forward_sync_buffers(ddp_class: type) -> bool:
    """torch 2.13 split DDP's `broadcast_buffers` into the sync at construction (always) and
    `forward_sync_buffers` (before every forward); older torch (the GPU machine's 2.11) has only
    `broadcast_buffers`, which turns off both."""
    return "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters


def no_forward_buffer_sync(ddp_class: type) -> dict[str, bool]:
    """DDP's keyword that stops the buffer broadcast before every forward, in this torch's spelling
    (the deprecated `broadcast_buffers` warns where its replacement exists)."""
    return {"forward_sync_buffers" if _has_forward_sync_buffers(ddp_class) else "broadcast_buffers": False}


@torch.no_grad()
def broadcast_buffers_(module: nn.Module) -> None:
    """Every buffer of `module` (BatchNorm statistics and step counts) set to rank 0's, in place: DDP's
    sync at construction, which torch before 2.13 turns off together with the one before every forward."""
    if not active():
        return
    buffers = list(module.buffers())
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=0)
        _unflatten(flat, group)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Floating-point buffers (BatchNorm running statistics) averaged over ranks, in place.

    Each rank's trainable BatchNorm layers track the statistics of its own half of every batch;
    their average is the running mean a single process would have tracked over the global batch
    (running variances differ only by the spread between the ranks' batch means). Frozen layers
    hold identical buffers on every rank, which averaging leaves as they are."""
    if not active():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        _unflatten(flat, group)


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """`flat` (the tensors concatenated) copied back into `tensors`, in place."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
