"""One variant, from a fresh model to its result row, in four steps: build (model, freezing, FLOPs,
the frozen prefix split off), data (loaders, or the feature cache), train (optimizer, trainer,
profiler window) and row. As in timm's benchmark runners, setup happens in the constructor and
`run()` returns a flat dict; the wall clock starts before the first step, so a variant's time includes
its own build, FLOP count and cache.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.context import RunContext
from bench.distributed import scaled_lr
from bench.feature_cache import build_cache
from bench.flops import eval_flops_per_image, mfu, train_flops_per_image
from bench.inputs import make_loader
from bench.measure import PeakMemory, median
from bench.schema import Status
from bench.settings import Settings, TrainSettings
from bench.trace import VariantTrace, plan_window, summarise_trace
from bench.train import PRECISIONS, EpochStats, EvalStats, Trainer, make_optimizer, make_scheduler
from bench.variants import Variant
from models import FreezePlan, SplitModel, apply_unfreeze, build_model, set_train_mode, split_frozen
from pipelines import Split


BREAKDOWN_WARMUP, BREAKDOWN_STEPS = 3, 10  # --breakdown's window, after training


def variant_settings(base: Settings, variant: Variant, ctx: RunContext) -> Settings:
    """The settings a variant trains with: its overrides, and the learning rate for the global batch
    under --parallel data with --lr-scale-world."""
    s = variant.apply(base)
    return s.replace(lr=scaled_lr(s.train.lr, s.train.lr_scale_world, ctx.shard[1]))


@dataclass
class Network:
    model: nn.Module            # the whole model: what a checkpoint saves
    plan: FreezePlan
    split: SplitModel | None    # the frozen prefix run apart under no_grad, when it can be cut off

    @property
    def trained(self) -> nn.Module:
        return self.split or self.model


def weights_key(s: Settings) -> tuple:
    """Which loaded weights a variant starts from: pretext weights are trained at the variant's image size."""
    return s.model.model, s.model.weights, s.data.image_size if s.model.weights == "pretext" else None


def build_network(s: Settings, num_classes: int, pretrained, device: torch.device) -> Network:
    torch.manual_seed(s.train.seed)  # every variant starts from the same head initialisation
    m = s.model
    model = build_model(m.model, num_classes, pretrained[weights_key(s)], m.head)
    plan = apply_unfreeze(model, m.unfreeze, m.unit, m.model)
    model = model.to(device, memory_format=torch.channels_last if s.speed.channels_last else torch.contiguous_format)
    return Network(model, plan, split_frozen(model) if s.splits_trunk else None)


def make_trainer(s: Settings, ctx: RunContext, network: Network, trained: nn.Module, *, total_steps: int,
                 steps_per_epoch: int) -> Trainer:
    t, speed = s.train, s.speed
    params = [p for p in network.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(t.optimizer, params, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
                               device=ctx.device)
    scheduler = make_scheduler(t.scheduler, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               step_size=t.step_size, gamma=t.gamma, patience=t.plateau_patience)
    return Trainer(trained, device=ctx.device, precision=speed.precision, compile=speed.compile,
                   compile_mode=speed.compile_mode, compile_backend=speed.compile_backend, optimizer=optimizer,
                   scheduler=scheduler, label_smoothing=t.label_smoothing, data_parallel=ctx.data_parallel,
                   warmup_steps=steady_skip(t.warmup_steps, min(steps_per_epoch, total_steps)))


class VariantRun:
    def __init__(self, s: Settings, ctx: RunContext, variant: Variant, splits: tuple[Split, Split], num_classes: int,
                 pretrained, on_progress: Callable[..., None] | None = None):
        self.start = time.perf_counter()
        self.s, self.ctx, self.variant, self.num_classes, self.on_progress = s, ctx, variant, num_classes, on_progress
        self.throughput = s.train.steps is not None  # timm-style: training steps only, no evaluation
        self.graphs_before = fresh_compiler_state() if s.speed.compile else 0
        self.cache_before = compile_cache_lookups() if s.speed.compile else None
        self.build(pretrained)
        self.data(splits)
        self.setup_training()

    @property
    def model(self) -> nn.Module:
        return self.network.model

    def build(self, pretrained) -> None:
        s = self.s
        self.network = build_network(s, self.num_classes, pretrained, self.ctx.device)
        # FLOPs of one training image for exactly this trainable configuration (counted on the meta device).
        self.flops = train_flops_per_image(self.network.model, s.data.image_size, channels_last=s.speed.channels_last)

    def data(self, splits: tuple[Split, Split]) -> None:
        s, device, split = self.s, self.ctx.device, self.network.split
        self.trained, self.cache_s, self.caches = self.network.trained, None, None
        if s.speed.feature_cache and split is not None:
            # --augment none: the trunk sees the same input every epoch, so it runs once per image; the
            # build is part of the variant's time, the price of the speed-up.
            cache_start = time.perf_counter()
            self.caches = [build_cache(split, make_loader(s, part, device, train=False), device=device,
                                       dtype=PRECISIONS[s.speed.precision], precision=s.speed.precision)
                           for part in (splits[:1] if self.throughput else splits)]
            self.train_loader = self.caches[0].batches(s.train.batch_size, shuffle=True, seed=s.train.seed,
                                                       drop_last=True)
            self.eval_loader = None if self.throughput else self.caches[1].batches(s.train.eval_batch, shuffle=False)
            self.trained = split.tail
            self.flops -= eval_flops_per_image(split.trunk, s.data.image_size, channels_last=s.speed.channels_last)
            self.cache_s = round(time.perf_counter() - cache_start, 3)
        else:
            self.train_loader = make_loader(s, splits[0], device, train=True, shard=self.ctx.shard)
            self.eval_loader = make_loader(s, splits[1], device, train=False, shard=self.ctx.shard)
        # Seed 000 scored the training set with a full extra pass each epoch; optional, and timed apart.
        self.train_eval_loader = None
        if s.train.train_acc and not self.throughput:
            self.train_eval_loader = (self.caches[0].batches(s.train.eval_batch, shuffle=False) if self.caches
                                      else make_loader(s, splits[0], device, train=False, shard=self.ctx.shard))

    def setup_training(self) -> None:
        t = self.s.train
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = (t.warmup_steps + t.steps if self.throughput
                            else t.max_steps or t.epochs * self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.trainer = make_trainer(self.s, self.ctx, self.network, self.trained, total_steps=self.total_steps,
                                    steps_per_epoch=self.steps_per_epoch)
        self.stopper = EarlyStopping(t.early_stop, t.early_stop_metric)
        ctx = self.ctx
        self.window = (plan_window(self.total_steps, t.warmup_steps, ctx.trace_steps)
                       if ctx.trace_dir is not None else None)
        self.tracer = (VariantTrace(ctx.trace_dir / self.variant.name, self.window, ctx.device, worker=ctx.worker)
                       if self.window else None)

    def run(self) -> dict:
        self.trainer.memory.start()
        history, epochs, train_acc_s, ev = [], [], 0.0, None
        with self.tracer or contextlib.nullcontext():
            for epoch in range(1, self.epochs + 1):
                set_train_mode(self.network.model, self.network.plan, self.s.model.frozen_bn)
                stats = self.trainer.train_epoch(self.train_loader, max_steps=self.total_steps - self.trainer.steps_done,
                                                 on_step=self.ticker(epoch))
                record = {"epoch": epoch, "train_loss": round(stats.loss, 5)}
                ev = None if self.throughput else self.trainer.evaluate(self.eval_loader, self.num_classes)
                epochs.append((stats, ev))
                history.append(record)
                if ev is None:
                    record["elapsed_s"] = round(time.perf_counter() - self.start, 3)
                    continue
                self.trainer.end_epoch(ev.loss)
                record.update(val_loss=round(ev.loss, 5), top1=round(ev.top1, 3), top5=round(ev.top5, 3),
                              lr=self.trainer.optimizer.param_groups[0]["lr"])
                if self.train_eval_loader is not None:
                    on_train = self.trainer.evaluate(self.train_eval_loader, self.num_classes)
                    record["train_top1"] = round(on_train.top1, 3)
                    train_acc_s += on_train.wall_s
                record["elapsed_s"] = round(time.perf_counter() - self.start, 3)
                if self.stopper.should_stop(ev):
                    break
        row = self.row(history, epochs, ev, train_acc_s)
        if self.s.speed.breakdown:  # after the row's clock stopped: kept out of its time and images/s
            split = self.network.split
            frozen = split is not None and not self.caches  # from the cache, the trunk already ran
            set_train_mode(self.network.model, self.network.plan, self.s.model.frozen_bn)  # evaluation left it in eval
            row["breakdown"] = self.trainer.phases(self.train_loader, split.trunk if frozen else None,
                                                   split.tail if split is not None else self.network.model,
                                                   steps=BREAKDOWN_STEPS, warmup=BREAKDOWN_WARMUP)
        return row

    def ticker(self, epoch: int) -> Callable[[int, int], None]:
        def tick(step: int, images: int) -> None:
            if self.tracer is not None:
                self.tracer.step()
            if self.on_progress is not None:
                self.on_progress(epoch=epoch, epochs=self.epochs, step=step, steps=self.steps_per_epoch, images=images,
                                 done=self.trainer.steps_done, total=self.total_steps)
        return tick

    def row(self, history: list[dict], epochs: list[tuple[EpochStats, EvalStats | None]], ev: EvalStats | None,
            train_acc_s: float) -> dict:
        s, ctx = self.s, self.ctx
        wall = time.perf_counter() - self.start
        gpu_hours = wall * ctx.devices_used / 3600.0
        speed = summarise(s.train, s.speed.compile, epochs, exclude=self.window.steps if self.window else range(0),
                          cache_s=self.cache_s)
        # MFU counts the work the device did while training: with the cache, the tail's FLOPs at the tail's rate.
        work_rate = speed["tail_images_per_s"] or speed["images_per_s"]
        split = self.network.split
        row = {
            **plan_fields(self.variant, self.network.plan),
            "seed": s.train.seed,
            "status": Status.OK,
            "error": None,
            "mode": "throughput" if self.throughput else "train",
            **speed,
            **memory_fields(self.trainer.memory),
            "train_gflops_per_image": round(self.flops / 1e9, 4),
            "achieved_tflops": round(work_rate * self.flops / 1e12, 4),
            "mfu": _rounded(mfu(work_rate, self.flops, ctx.ceiling_tflops), 4),
            "compile_graphs": compiled_graphs() - self.graphs_before if s.speed.compile else None,
            **compile_cache_fields(self.cache_before),
            "trunk_cut": split.cut if split is not None else None,
            "feature_cache_s": self.cache_s,
            "epochs": len(history),
            "steps": self.trainer.steps_done,
            "stopped_early": len(history) < self.epochs,
            "top1": None if ev is None else round(ev.top1, 3),
            "top5": None if ev is None else round(ev.top5, 3),
            "train_acc_s": round(train_acc_s, 3),
            "wall_s": round(wall, 3),
            "gpu_hours": gpu_hours,
            "acc_per_gpu_hour": None if ev is None else round(ev.top1 / gpu_hours, 2),
            "history": history,
        }
        if self.tracer is not None:
            row["trace_export_s"] = round(self.tracer.export_s, 3)
            row["trace"] = summarise_trace(self.tracer.run_dir, worker=self.tracer.worker)
        return row


def memory_fields(memory: PeakMemory) -> dict:
    """The steady-state peaks as the headline; the warm-up's (cuDNN's autotuning, compilation) apart."""
    return {"peak_mem_bytes": memory.bytes, "device_peak_mem_bytes": memory.device_bytes,
            "warmup_peak_mem_bytes": memory.warmup_bytes, "warmup_device_peak_mem_bytes": memory.warmup_device_bytes}


def plan_fields(variant: Variant, plan: FreezePlan) -> dict:
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "unfreeze": plan.depth if plan.depth < plan.num_layers else "all",
        "unit": plan.unit,
        "trainable_params": plan.trainable_params,
        "trainable_tensors": plan.trainable_tensors,
        "total_params": plan.total_params,
        "trainable_layers": plan.trainable_layers,
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class EarlyStopping:
    """Stop when the validation metric has not improved for `patience` epochs (0: never stop)."""

    def __init__(self, patience: int, metric: str):
        self.patience, self.metric = patience, metric
        self.best, self.stale = None, 0

    def should_stop(self, ev: EvalStats) -> bool:
        value = ev.loss if self.metric == "val_loss" else -ev.top1  # lower is better
        if self.best is None or value < self.best:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale


def steady_skip(warmup_steps: int, first_epoch_steps: int) -> int:
    """The first steps left out of the steady-state figures: `--warmup-steps`, fewer when the first
    epoch would have no step left after them."""
    return max(0, min(warmup_steps, first_epoch_steps - 1))


def summarise(t: TrainSettings, compiled: bool, epochs: list[tuple[EpochStats, EvalStats | None]],
              exclude: range = range(0), cache_s: float | None = None) -> dict:
    """Steady-state speed from the per-step times of every epoch.

    The run's first `warmup_steps` steps (compilation, cuDNN autotuning, allocator growth) and the
    `exclude` steps (the profiler's window) are left out of images/s, the median and the data wait;
    evaluation speed comes from the last evaluation without its first batch. Trained from the feature
    cache (`cache_s` its build time), the steady-state rate is the tail's, `tail_images_per_s`, and
    `images_per_s` is end to end: every image trained over the training time plus the cache's build.
    """
    first, first_eval = epochs[0]
    all_ms = [ms for stats, _ in epochs for ms in stats.step_ms]
    all_idle = [ms for stats, _ in epochs for ms in stats.idle_ms]
    skip = steady_skip(t.warmup_steps, len(first.step_ms))
    kept = [i for i in range(skip, len(all_ms)) if i not in exclude] or list(range(skip, len(all_ms)))
    step_ms = [all_ms[i] for i in kept]
    step_median = median(step_ms)
    last_eval = epochs[-1][1]  # None in throughput mode
    batch_ms = last_eval.batch_ms if last_eval else []
    timed_eval = batch_ms[1:] if len(batch_ms) > 1 else batch_ms
    eval_images = (last_eval.images - t.eval_batch if len(batch_ms) > 1 else last_eval.images) if last_eval else 0
    compile_s = 0.0
    if compiled:  # compilation happens inside the first training step and the first evaluation batch
        compile_s = max(0.0, first.step_ms[0] - step_median) / 1e3
        if first_eval is not None and first_eval.batch_ms:
            compile_s += max(0.0, first_eval.batch_ms[0] - (median(timed_eval) or 0.0)) / 1e3
    train_wall = sum(stats.wall_s for stats, _ in epochs)
    steady = round(t.batch_size * len(step_ms) / (sum(step_ms) / 1e3), 2)
    trained = sum(stats.images for stats, _ in epochs)
    return {
        "images_per_s": steady if cache_s is None else round(trained / (train_wall + cache_s), 2),
        "tail_images_per_s": None if cache_s is None else steady,
        "eval_images_per_s": round(eval_images / (sum(timed_eval) / 1e3), 2) if timed_eval else None,
        "step_ms_median": round(step_median, 3),
        # The share of the timed steps in which the device had none of our work: waiting for input.
        "data_wait_pct": round(100.0 * sum(all_idle[i] for i in kept) / sum(step_ms), 2),
        "compile_s": round(compile_s, 3),
        "train_s": round(train_wall, 3),
    }


def fresh_compiler_state() -> int:
    """Every compiled variant starts as a fresh process would: dynamo's caches hold the graphs of every
    earlier variant (they all run the same `forward` code), and past its recompile limit a later variant
    would silently run eager. Returns the graph count so far (the counter survives the reset)."""
    torch._dynamo.reset()
    return compiled_graphs()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# The caches a compile can be served from, which `torch._dynamo.reset()` leaves on disk: inductor's
# FX-graph cache and AOTAutograd's, under these counter names in torch 2.11 and 2.15 alike.
CACHE_COUNTERS = {"hits": (("inductor", "fxgraph_cache_hit"), ("aot_autograd", "autograd_cache_hit")),
                  "misses": (("inductor", "fxgraph_cache_miss"), ("aot_autograd", "autograd_cache_miss"))}


def compile_cache_lookups() -> dict[str, int]:
    """This process's compile-cache hits and misses so far (dynamo's reset does not clear the counters)."""
    counters = torch._dynamo.utils.counters
    return {kind: sum(counters[group][key] for group, key in keys) for kind, keys in CACHE_COUNTERS.items()}


def compile_cache_fields(before: dict[str, int] | None) -> dict:
    """The variant's compile-cache lookups since `before`, None when not compiled: a hit means its
    `compile_s` was partly a cache load (an earlier variant or an earlier process compiled the graph)."""
    if before is None:
        return {"compile_cache_hits": None, "compile_cache_misses": None}
    now = compile_cache_lookups()
    return {f"compile_cache_{kind}": now[kind] - before[kind] for kind in CACHE_COUNTERS}
