"""One training step, one epoch, one evaluation: the hot loop, free of host synchronisation.

Losses and correct counts accumulate in device tensors and are read once per epoch; a `.item()` per
step would stall the GPU queue every step (and make images/s correct only by accident).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bench import distributed
from bench.measure import PeakMemory, StepTimer, synchronize

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "plateau", "none")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float,
                   device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels update every tensor in one launch on CUDA and in one vectorised pass on the CPU
    # (Adam on ResNet-50 here: 11 ms a step against 42 ms for the per-tensor loop and 34 for foreach).
    fused = {"fused": device.type in ("cuda", "cpu")}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    raise ValueError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}")


def make_scheduler(name: str, optimizer, *, total_steps: int, steps_per_epoch: int, step_size: int,
                   gamma: float, patience: int = 2):
    """Stepped once per training step, except `plateau` (seed 003's), stepped once per epoch with the
    validation loss. Cosine anneals over the whole run (the seeds' per-epoch CosineAnnealingLR, at step
    granularity); `step_size` is in epochs."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=gamma, patience=patience)
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The mixed-precision context for `precision` (bf16, fp16, fp32 = off); training, evaluation,
    the feature cache and bench.evaluate all run under the same one."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# How libraries other than torch's allocator report that device memory ran out: cuBLAS and cuDNN
# fail to allocate their workspaces, DALI fails to grow its pools, the CUDA runtime returns its error.
OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                         "cudaErrorMemoryAllocation", "CUDA allocation failed", "CUDA_ERROR_OUT_OF_MEMORY")


def is_out_of_memory(error: BaseException) -> bool:
    """Every way a step can fail for lack of device memory, not only torch.OutOfMemoryError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OUT_OF_MEMORY_MARKERS))


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; `step` is the run's step (1-based) where it first did."""

    def __init__(self, step: int):
        super().__init__(f"non-finite training loss (nan/inf) at step {step}")
        self.step = step


# How often the step loop looks at the non-finite flag: one host sync per this many steps (the flag
# itself is kept on the device, so the step that went bad is exact whenever it is read).
NONFINITE_CHECK_EVERY = 50


@dataclass
class EpochStats:
    loss: float
    images: int
    step_ms: list[float]        # time between consecutive step starts (data wait included)
    idle_ms: list[float]        # per step interval: the device had none of our work (waiting for input)
    wall_s: float


@dataclass
class Predictions:
    """Per image, in the loader's order (numpy): top-1 class, whether the label is in the top 5, label."""
    pred: np.ndarray
    hitk: np.ndarray
    labels: np.ndarray


@dataclass
class EvalStats:
    loss: float
    top1: float
    top5: float
    images: int                 # scored by this process: its shard under data parallelism
    batch_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    predictions: Predictions | None = None


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


class Trainer:
    """Owns the forward (compiled or eager), loss, optimizer, scheduler and mixed-precision state."""

    def __init__(self, model: nn.Module, *, device: torch.device, precision: str, compile: bool,
                 compile_mode: str | None, optimizer: torch.optim.Optimizer, scheduler,
                 label_smoothing: float = 0.0, data_parallel: bool = False, compile_backend: str = "inductor",
                 warmup_steps: int = 0):
        self.model, self.device = model, device
        self.optimizer, self.scheduler = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.autocast = lambda: autocast(device, precision)
        # fp16 needs loss scaling; its step() checks for infs on the host, the only sync in the step.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        # Under torchrun with --parallel data: DDP over the trainable parameters (compiled around DDP,
        # so dynamo can split the graph at gradient-bucket boundaries); evaluation sums over ranks.
        self.data_parallel = data_parallel
        trained = distributed.wrap_ddp(model, device, compiled=compile) if data_parallel else model
        # dynamic=False: a second batch size (the evaluation's, the last partial batch) gets a graph of its
        # own instead of turning the batch dimension symbolic for every later call.
        self.network = (torch.compile(trained, mode=compile_mode, backend=compile_backend, dynamic=False)
                        if compile else trained)
        self.compiled = compile
        self.precision = precision
        self.per_step_schedule = not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.steps_done = 0
        # torch's and the whole device's peak (DALI's memory included), the first `warmup_steps` apart
        self.memory = PeakMemory(device, warmup_steps)

    def end_epoch(self, val_loss: float) -> None:
        """Epoch-level scheduling: ReduceLROnPlateau watches the validation loss."""
        if not self.per_step_schedule:
            self.scheduler.step(val_loss)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.criterion(self.network(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            self.scheduler.step()
        self.steps_done += 1
        return loss.detach()

    def train_epoch(self, loader, *, max_steps: int | None = None, on_step=None) -> EpochStats:
        """One pass over `loader` (or `max_steps` steps). `on_step(step, images)` is for progress
        display only and must not synchronise."""
        timer = StepTimer(self.device)
        loss_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # run step of the first nan/inf
        images_seen, steps = 0, 0
        synchronize(self.device)
        start = time.perf_counter()
        batches = iter(loader)
        while max_steps is None or steps < max_steps:
            batch = next(batches, None)
            if batch is None:
                break
            x, y = batch
            timer.mark()
            loss = self.step(x, y)
            timer.mark_end()
            self.memory.step_done(self.steps_done, early_in_epoch=steps < PeakMemory.SAMPLED_STEPS)
            loss_sum += loss * y.shape[0]
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.steps_done, first_bad)
            images_seen += y.shape[0]
            steps += 1
            if on_step is not None:
                on_step(steps, images_seen)
            if steps % NONFINITE_CHECK_EVERY == 0 and first_bad.item() >= 0:
                raise NonFiniteLoss(int(first_bad))
        timer.mark()
        self.memory.sample()
        synchronize(self.device)
        wall = time.perf_counter() - start
        if first_bad.item() >= 0:
            raise NonFiniteLoss(int(first_bad))
        for _ in batches:  # a truncated epoch (max_steps): let DALI finish it, outside the timed region
            pass
        return EpochStats(loss=(loss_sum / max(images_seen, 1)).item(), images=images_seen,
                          step_ms=timer.intervals_ms(), idle_ms=timer.idle_ms(), wall_s=wall)

    def evaluate(self, loader, num_classes: int) -> EvalStats:
        """Loss, top-1 and top-5 over the whole split (under data parallelism, every rank's shard)."""
        if self.data_parallel:  # every rank scores with the same BatchNorm statistics
            distributed.average_buffers(self.model)
        self.model.eval()
        stats = evaluate(self.network, loader, device=self.device, precision=self.precision, num_classes=num_classes,
                         pad_partial=self.compiled, all_ranks=self.data_parallel)
        self.memory.sample()
        return stats


    def phases(self, loader, trunk: nn.Module | None, tail: nn.Module, *, steps: int, warmup: int) -> dict:
        """--breakdown: the training step cut at its phase edges (input wait, the frozen prefix's
        forward, the trainable part's forward and loss, backward, optimizer), with a synchronisation
        at every edge; the median of each phase over `steps` steps after `warmup`, in ms, and the
        median whole step (`step_ms`). Eager modules, one rank alone: the extra synchronisations and
        the missing overlap make this a picture of where time goes, not a throughput figure. The
        model, optimizer and loss scaler are restored afterwards, so the trained weights are as the
        row reports them. `trunk` None: nothing frozen runs apart (its time is in the forward)."""
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                 copy.deepcopy(self.scaler.state_dict()))
        times: dict[str, list[float]] = {k: [] for k in (*PHASES, "step_ms")}
        batches = iter(loader)
        try:
            for i in range(warmup + steps):
                synchronize(self.device)
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:  # a short split: the next epoch
                    batches = iter(loader)
                    batch = next(batches)
                x, y = batch
                edges = [t0, self._edge()]
                with self.autocast():
                    if trunk is not None:
                        with torch.no_grad():
                            x = trunk(x)
                    edges.append(self._edge())
                    loss = self.criterion(tail(x), y)
                edges.append(self._edge())
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                edges.append(self._edge())
                self.scaler.step(self.optimizer)
                self.scaler.update()
                edges.append(self._edge())
                if i >= warmup:
                    for key, start, end in zip(PHASES, edges, edges[1:]):
                        times[key].append(1e3 * (end - start))
                    times["step_ms"].append(1e3 * (edges[-1] - edges[0]))
            for _ in batches:  # let DALI finish the epoch it started
                pass
        finally:
            self.model.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            self.scaler.load_state_dict(saved[2])
        out = {key: round(float(np.median(v)), 3) for key, v in times.items()}
        if trunk is None:
            out["frozen_forward_ms"] = None
        return {**out, "steps": steps, "warmup": warmup}

    def _edge(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


PHASES = ("input_ms", "frozen_forward_ms", "trainable_forward_ms", "backward_ms", "optimizer_ms")


# no_grad, not inference_mode: inference tensors would make a compiled forward recompile
# for batches created inside and outside the mode (DALI prefetches the first one outside).
@torch.no_grad()
def evaluate(forward, loader, *, device: torch.device, precision: str, num_classes: int, pad_partial: bool = False,
             all_ranks: bool = False, keep_predictions: bool = False) -> EvalStats:
    """Scores `forward` (a module in eval mode) over every batch of `loader`: the harness's evaluation
    after each epoch and bench.evaluate's, so both agree to the image.

    `pad_partial`: a compiled forward sees one shape only, so the last partial batch is padded instead
    of recompiled (eval-mode BatchNorm keeps samples independent, so padding changes nothing).
    `all_ranks`: sums are all-reduced over the process group; `images`, `batch_ms` and `wall_s` stay
    this process's. `keep_predictions`: also every image's prediction, copied to the host once."""
    k = min(5, num_classes)
    timer = StepTimer(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct1 = torch.zeros((), device=device, dtype=torch.int64)
    correctk = torch.zeros_like(correct1)
    kept: list[tuple[torch.Tensor, ...]] = []
    n, full = 0, None
    synchronize(device)
    start = time.perf_counter()
    for x, y in loader:
        timer.mark()
        full = full or x.shape[0]
        rows = x.shape[0]
        if pad_partial and rows < full:
            x = torch.cat([x, x.new_zeros((full - rows, *x.shape[1:]))]).contiguous(memory_format=_layout(x))
        with autocast(device, precision):
            logits = forward(x)[:rows]
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        hits = topk == y[:, None]
        correct1 += hits[:, 0].sum()
        correctk += hits.any(dim=1).sum()
        if keep_predictions:
            kept.append((topk[:, 0], hits.any(dim=1), y))
        n += y.shape[0]
    timer.mark()
    synchronize(device)
    wall = time.perf_counter() - start
    local = n
    if all_ranks:
        sums = torch.stack([loss_sum, correct1.double(), correctk.double(),
                            torch.tensor(float(n), dtype=torch.float64, device=device)])
        loss_sum, correct1, correctk, total = distributed.all_reduce_(sums).unbind()
        n = int(total.item())
    predictions = Predictions(*(torch.cat(parts).cpu().numpy() for parts in zip(*kept))) if kept else None
    if n == 0:
        return EvalStats(math.nan, math.nan, math.nan, 0, [], wall)
    return EvalStats(loss=loss_sum.item() / n, top1=100.0 * correct1.item() / n, top5=100.0 * correctk.item() / n,
                     images=local, batch_ms=timer.intervals_ms(), wall_s=wall, predictions=predictions)
