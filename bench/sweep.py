"""The sweep: every variant on a fresh model, trained, evaluated and measured; one result row each.

A variant that fails (out of memory, non-finite loss, any error) is recorded with its status and the
sweep goes on; rows are written after every variant, so nothing finished is ever lost.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.distributed import data_parallel, data_shard, lr_for_world, worker_name
from bench.feature_cache import build_cache
from bench.flops import eval_flops_per_image, mfu, train_flops_per_image
from bench.measure import median, peak_memory, reset_peak_memory
from bench.trace import VariantTrace, plan_window, summarise_trace
from bench.train import (PRECISIONS, EpochStats, EvalStats, NonFiniteLoss, Trainer, is_out_of_memory, make_optimizer,
                         make_scheduler)
from bench.variants import Variant
from models import FreezePlan, apply_unfreeze, build_model, set_train_mode, split_frozen
from pipelines import NORMALIZE, Split, loader_class


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


def make_loader(cfg: argparse.Namespace, split: Split, device: torch.device, *, train: bool):
    mean, std = NORMALIZE[cfg.normalize]
    rank, world = data_shard(cfg)  # under torchrun --parallel data: this rank's part of every epoch
    return loader_class(cfg.loader)(
        split.images, split.labels, batch_size=cfg.batch_size if train else cfg.eval_batch_size or cfg.batch_size,
        train=train, image_size=cfg.image_size, mean=mean, std=std, device=device,
        augment=cfg.augment if train else "none", half=cfg.precision != "fp32", seed=cfg.seed,
        num_threads=cfg.workers, rank=rank, world_size=world)


def run_variant(cfg: argparse.Namespace, variant: Variant, splits: tuple[Split, Split], num_classes: int,
                pretrained, device: torch.device, on_progress: Callable[..., None] | None = None,
                on_trained: Callable[[torch.nn.Module, dict, argparse.Namespace], None] | None = None) -> dict:
    """Train on `splits[0]`, evaluate on `splits[1]`; returns the result row (HARNESS.md's per-depth fields).
    `on_trained(model, row, cfg)` sees the trained model before it is released (checkpoints).

    With `--steps N` (throughput mode) the variant trains `warmup_steps + N` steps and is not evaluated."""
    start = time.perf_counter()  # the variant's wall clock: its own build, FLOP count and cache included
    graphs_before = fresh_compiler_state() if cfg.compile else 0
    torch.manual_seed(cfg.seed)  # every variant starts from the same head initialisation
    model = build_model(cfg.model, num_classes, pretrained[cfg.model, cfg.weights], cfg.head)
    plan = apply_unfreeze(model, cfg.unfreeze, cfg.unit, cfg.model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    throughput = cfg.steps is not None
    # FLOPs of one training image for exactly this trainable configuration (counted on the meta device).
    flops = train_flops_per_image(model, cfg.image_size, channels_last=cfg.channels_last)
    # The frozen prefix runs under no_grad in eval mode: no activations kept for a backward it never has.
    split = split_frozen(model) if cfg.split_trunk and cfg.frozen_bn == "eval" else None
    net = split or model

    cache_s = None
    if cfg.feature_cache and split is not None:
        # --augment none: the trunk sees the same input every epoch, so run it once per image. Building
        # the cache is part of the variant's wall time (and GPU-hours): it is the price of the speed-up.
        cache_start = time.perf_counter()
        caches = [build_cache(split, make_loader(cfg, s, device, train=False), device=device,
                              dtype=PRECISIONS[cfg.precision], precision=cfg.precision)
                  for s in (splits[:1] if throughput else splits)]  # throughput mode evaluates nothing
        train_loader = caches[0].batches(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
        eval_loader = None if throughput else caches[1].batches(cfg.eval_batch_size or cfg.batch_size, shuffle=False)
        net = split.tail
        flops -= eval_flops_per_image(split.trunk, cfg.image_size, channels_last=cfg.channels_last)
        cache_s = round(time.perf_counter() - cache_start, 3)
    else:
        caches = None
        train_loader = make_loader(cfg, splits[0], device, train=True)
        eval_loader = make_loader(cfg, splits[1], device, train=False)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.warmup_steps + cfg.steps if throughput else cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, device=device)
    scheduler = make_scheduler(cfg.scheduler, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               step_size=cfg.step_size, gamma=cfg.gamma, patience=cfg.plateau_patience)
    trainer = Trainer(net, device=device, precision=cfg.precision, compile=cfg.compile,
                      compile_mode=cfg.compile_mode, compile_backend=cfg.compile_backend, optimizer=optimizer,
                      scheduler=scheduler, label_smoothing=cfg.label_smoothing, data_parallel=data_parallel(cfg))

    # Seed 000 measured training accuracy with a full extra pass each epoch; optional, and timed apart.
    # From the cache, the pass scores the cached training features (the tail is what is trained).
    train_eval_loader = None
    if cfg.train_acc and not throughput:
        train_eval_loader = (caches[0].batches(cfg.eval_batch_size or cfg.batch_size, shuffle=False) if caches
                             else make_loader(cfg, splits[0], device, train=False))
    stopper = EarlyStopping(cfg.early_stop, cfg.early_stop_metric)

    window = plan_window(total_steps, cfg.warmup_steps, cfg.trace_steps) if cfg.trace else None
    tracer = (VariantTrace(Path(cfg.trace_dir) / variant.name, window, device, worker=worker_name(cfg))
              if window else None)

    reset_peak_memory(device)
    history, epochs_stats, train_acc_s = [], [], 0.0
    ev = None
    with tracer or contextlib.nullcontext():
        for epoch in range(1, epochs + 1):
            set_train_mode(model, plan, cfg.frozen_bn)

            def tick(step, images, epoch=epoch):
                if tracer is not None:
                    tracer.step()
                if on_progress is not None:
                    on_progress(epoch=epoch, epochs=epochs, step=step, steps=steps_per_epoch, images=images,
                                done=trainer.steps_done, total=total_steps)
            stats = trainer.train_epoch(train_loader, max_steps=total_steps - trainer.steps_done, on_step=tick)
            if throughput:  # the timm-style benchmark: training steps only
                epochs_stats.append((stats, None))
                history.append({"epoch": epoch, "train_loss": round(stats.loss, 5),
                                "elapsed_s": round(time.perf_counter() - start, 3)})
                continue
            ev = trainer.evaluate(eval_loader, num_classes)
            trainer.end_epoch(ev.loss)
            epochs_stats.append((stats, ev))
            history.append({"epoch": epoch, "train_loss": round(stats.loss, 5), "val_loss": round(ev.loss, 5),
                            "top1": round(ev.top1, 3), "top5": round(ev.top5, 3),
                            "lr": trainer.optimizer.param_groups[0]["lr"]})
            if train_eval_loader is not None:
                on_train = trainer.evaluate(train_eval_loader, num_classes)
                history[-1]["train_top1"] = round(on_train.top1, 3)
                train_acc_s += on_train.wall_s
            history[-1]["elapsed_s"] = round(time.perf_counter() - start, 3)
            if stopper.should_stop(ev):
                break
    wall = time.perf_counter() - start
    gpu_hours = wall * cfg.devices_used / 3600.0
    speed = summarise(cfg, epochs_stats, exclude=window.steps if window else range(0), cache_s=cache_s)
    # MFU counts the work the device did while training: with the cache, the tail's FLOPs at the tail's rate.
    work_rate = speed["tail_images_per_s"] or speed["images_per_s"]
    achieved = work_rate * flops / 1e12
    row = {
        **plan_fields(variant, plan),
        "status": "ok",
        "error": None,
        "mode": "throughput" if throughput else "train",
        **speed,
        "peak_mem_bytes": peak_memory(device),
        "device_peak_mem_bytes": trainer.device_peak.bytes,
        "train_gflops_per_image": round(flops / 1e9, 4),
        "achieved_tflops": round(achieved, 4),
        "mfu": _rounded(mfu(work_rate, flops, getattr(cfg, "ceiling_tflops", None)), 4),
        "compile_graphs": compiled_graphs() - graphs_before if cfg.compile else None,
        "trunk_cut": split.cut if split is not None else None,
        "feature_cache_s": cache_s,
        "epochs": len(history),
        "steps": trainer.steps_done,
        "stopped_early": len(history) < epochs,
        "top1": None if ev is None else round(ev.top1, 3),
        "top5": None if ev is None else round(ev.top5, 3),
        "train_acc_s": round(train_acc_s, 3),
        "wall_s": round(wall, 3),
        "gpu_hours": gpu_hours,
        "acc_per_gpu_hour": None if ev is None else round(ev.top1 / gpu_hours, 2),
        "history": history,
    }
    if tracer is not None:
        row["trace_export_s"] = round(tracer.export_s, 3)
        row["trace"] = summarise_trace(tracer.run_dir, worker=tracer.worker)
    if on_trained is not None and not throughput:
        on_trained(model, row, cfg)
    return row


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


def summarise(cfg: argparse.Namespace, epochs: list[tuple[EpochStats, EvalStats]], exclude: range = range(0),
              cache_s: float | None = None) -> dict:
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
    skip = min(cfg.warmup_steps, len(first.step_ms) - 1)
    kept = [i for i in range(skip, len(all_ms)) if i not in exclude] or list(range(skip, len(all_ms)))
    step_ms = [all_ms[i] for i in kept]
    step_median = median(step_ms)
    last_eval = epochs[-1][1]  # None in throughput mode
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    batch_ms = last_eval.batch_ms if last_eval else []
    timed_eval = batch_ms[1:] if len(batch_ms) > 1 else batch_ms
    eval_images = (last_eval.images - eval_bs if len(batch_ms) > 1 else last_eval.images) if last_eval else 0
    compile_s = 0.0
    if cfg.compile:  # compilation happens inside the first training step and the first evaluation batch
        compile_s = max(0.0, first.step_ms[0] - step_median) / 1e3
        if first_eval is not None and first_eval.batch_ms:
            compile_s += max(0.0, first_eval.batch_ms[0] - (median(timed_eval) or 0.0)) / 1e3
    train_wall = sum(stats.wall_s for stats, _ in epochs)
    steady = round(cfg.batch_size * len(step_ms) / (sum(step_ms) / 1e3), 2)
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


def failed_row(variant: Variant, plan_row: dict, status: str, error: BaseException, **extra) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {**plan_row, "variant": variant.name, "kind": variant.kind, "status": status,
            "error": f"{type(error).__name__}: {message}", **extra,
            "traceback": "".join(traceback.format_exception(error)) if status == "error" else None}


def withhold_accuracy(row: dict, reason: str) -> dict:
    """The leakage guard's verdict: speed stays, accuracy is not reported."""
    history = [{k: v for k, v in h.items() if k not in ("top1", "top5", "val_loss")} for h in row.get("history", [])]
    return {**row, "status": "overlap", "error": reason, "top1": None, "top5": None, "acc_per_gpu_hour": None,
            "history": history}


def release_memory(device: torch.device) -> None:
    """Between variants: nothing of the last model may survive into the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_with_oom_policy(cfg: argparse.Namespace, variant: Variant, plan_row: dict, run, device: torch.device) -> dict:
    """`run(cfg)` once (`--oom fail`), or with the batch halved after each out-of-memory error until it
    fits (`--oom retry`, as timm's benchmark does), the learning rate scaled with it if `--oom-scale-lr`."""
    failed: list[int] = []
    while True:
        try:
            row = run(cfg)
            return {**row, "batch_size": cfg.batch_size, "lr": cfg.lr, "oom_batch_sizes": failed}
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failed.append(cfg.batch_size)
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            message = f"out of memory at batch size {cfg.batch_size} ({cause})"
            del e  # its traceback holds the failed variant's tensors
        release_memory(device)
        if cfg.oom != "retry" or cfg.batch_size == 1:
            return failed_row(variant, plan_row, "oom", torch.OutOfMemoryError(message),
                              batch_size=failed[-1], oom_batch_sizes=failed)
        half = cfg.batch_size // 2
        lr = cfg.lr * half / cfg.batch_size if cfg.oom_scale_lr else cfg.lr
        cfg = argparse.Namespace(**{**vars(cfg), "batch_size": half, "lr": lr})


def run_sweep(base: argparse.Namespace, variants: list[Variant], plans: list[dict], splits: tuple[Split, Split],
              num_classes: int, pretrained, device: torch.device, *, on_row: Callable[[dict], None],
              on_progress: Callable[..., None] | None = None, withhold: str | None = None,
              on_trained: Callable[[torch.nn.Module, dict, argparse.Namespace], None] | None = None) -> list[dict]:
    """Runs every variant; `on_row` gets each finished row. `withhold`: why accuracy must not be reported.

    Ctrl-C (or SIGTERM, raised as KeyboardInterrupt) records the running variant as `interrupted`
    before it propagates, so the files always say what happened to every variant that started."""
    rows: list[dict] = []
    for variant, plan_row in zip(variants, plans):
        cfg = lr_for_world(variant.apply(base))  # --lr-scale-world: the lr for the global batch
        progress = (lambda v=variant, **kw: on_progress(variant=v, **kw)) if on_progress else None

        def run(c, variant=variant, progress=progress):
            return run_variant(c, variant, splits, num_classes, pretrained, device, progress,
                               None if withhold else on_trained)
        try:
            row = run_with_oom_policy(cfg, variant, plan_row, run, device)
            if withhold and row["status"] == "ok":
                row = withhold_accuracy(row, withhold)
        except NonFiniteLoss as e:
            row = failed_row(variant, plan_row, "nan", e, nan_step=e.step)
        except KeyboardInterrupt as e:
            row = failed_row(variant, plan_row, "interrupted", e)
            rows.append(row)
            on_row(row)
            raise
        except Exception as e:  # recorded in the row; the sweep goes on with the next variant
            row = failed_row(variant, plan_row, "error", e)
        release_memory(device)
        rows.append(row)
        on_row(row)
    return rows


def plan_variants(base: argparse.Namespace, variants: list[Variant], num_classes: int) -> list[dict]:
    """Freeze plans for every variant, computed before any training so bad depths fail fast."""
    models: dict[tuple, torch.nn.Module] = {}
    plans = []
    for v in variants:
        cfg = v.apply(base)
        key = (cfg.model, cfg.head)
        if key not in models:
            models[key] = build_model(cfg.model, num_classes, None, cfg.head)
        plans.append(plan_fields(v, apply_unfreeze(models[key], cfg.unfreeze, cfg.unit, cfg.model)))
    return plans
