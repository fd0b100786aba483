"""The sweep: every variant on a fresh model (`bench.variant`), one result row each.

A variant that fails (out of memory, non-finite loss, any error) is recorded with its status and the
sweep goes on; rows are handed on after every variant, so nothing finished is ever lost.
"""
from __future__ import annotations

import gc
import traceback
from collections.abc import Callable

import torch

from bench.context import RunContext
from bench.errors import first_line
from bench.schema import Status
from bench.settings import Settings
from bench.train import NonFiniteLoss, is_out_of_memory
from bench.variant import VariantRun, plan_fields, variant_settings
from bench.variants import Variant
from models import apply_unfreeze, build_model
from pipelines import Split

OnTrained = Callable[[torch.nn.Module, dict, Settings], None]


def failed_row(variant: Variant, plan_row: dict, status: Status, error: BaseException, **extra) -> dict:
    return {**plan_row, "variant": variant.name, "kind": variant.kind, "status": status,
            "error": f"{type(error).__name__}: {first_line(error)}", **extra,
            "traceback": "".join(traceback.format_exception(error)) if status == Status.ERROR else None}


def withhold_accuracy(row: dict, reason: str) -> dict:
    """The leakage guard's verdict: speed stays, accuracy is not reported."""
    history = [{k: v for k, v in h.items() if k not in ("top1", "top5", "val_loss")} for h in row.get("history", [])]
    return {**row, "status": Status.OVERLAP, "error": reason, "top1": None, "top5": None, "acc_per_gpu_hour": None,
            "history": history}


def release_memory(device: torch.device) -> None:
    """Between variants: nothing of the last model may survive into the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_with_oom_policy(s: Settings, variant: Variant, plan_row: dict, run: Callable[[Settings], dict],
                        device: torch.device) -> dict:
    """`run(s)` once (`--oom fail`), or with the batch halved after each out-of-memory error until it
    fits (`--oom retry`, as timm's benchmark does), the learning rate scaled with it if `--oom-scale-lr`."""
    failed: list[int] = []
    while True:
        batch = s.train.batch_size
        try:
            return {**run(s), "batch_size": batch, "lr": s.train.lr, "oom_batch_sizes": failed}
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failed.append(batch)
            message = f"out of memory at batch size {batch} ({first_line(e, 200)})"
            del e  # its traceback holds the failed variant's tensors
        release_memory(device)
        if s.train.oom != "retry" or batch == 1:
            return failed_row(variant, plan_row, Status.OOM, torch.OutOfMemoryError(message),
                              seed=s.train.seed, batch_size=failed[-1], oom_batch_sizes=failed)
        half = batch // 2
        s = s.replace(batch_size=half, lr=s.train.lr * half / batch if s.train.oom_scale_lr else s.train.lr)


def run_sweep(base: Settings, ctx: RunContext, variants: list[Variant], plans: list[dict], splits: tuple[Split, Split],
              num_classes: int, pretrained, *, on_row: Callable[[dict], None],
              on_progress: Callable[..., None] | None = None, withhold: str | None = None,
              on_trained: OnTrained | None = None) -> list[dict]:
    """Runs every variant; `on_row` gets each finished row, `on_trained(model, row, settings)` each
    trained model before it is released (checkpoints). `withhold`: why accuracy must not be reported.

    Ctrl-C (or SIGTERM, raised as KeyboardInterrupt) records the running variant as `interrupted`
    before it propagates, so the files always say what happened to every variant that started."""
    rows: list[dict] = []
    for variant, plan_row in zip(variants, plans):
        progress = (lambda v=variant, **kw: on_progress(variant=v, **kw)) if on_progress else None

        def run(s: Settings, variant=variant, progress=progress) -> dict:
            attempt = VariantRun(s, ctx, variant, splits, num_classes, pretrained, progress)
            row = attempt.run()
            if on_trained is not None and not withhold and row["mode"] == "train":
                on_trained(attempt.model, row, s)
            return row
        try:
            row = run_with_oom_policy(variant_settings(base, variant, ctx), variant, plan_row, run, ctx.device)
            if withhold and row["status"] == Status.OK:
                row = withhold_accuracy(row, withhold)
        except NonFiniteLoss as e:
            row = failed_row(variant, plan_row, Status.NAN, e, seed=base.train.seed, nan_step=e.step)
        except KeyboardInterrupt as e:
            row = failed_row(variant, plan_row, Status.INTERRUPTED, e, seed=base.train.seed)
            rows.append(row)
            on_row(row)
            raise
        except Exception as e:  # recorded in the row; the sweep goes on with the next variant
            row = failed_row(variant, plan_row, Status.ERROR, e, seed=base.train.seed)
        release_memory(ctx.device)
        rows.append(row)
        on_row(row)
    return rows


def plan_variants(base: Settings, variants: list[Variant], num_classes: int) -> list[dict]:
    """Freeze plans for every variant, computed before any training so bad depths fail fast."""
    models: dict[tuple, torch.nn.Module] = {}
    plans = []
    for v in variants:
        m = v.apply(base).model
        if (m.model, m.head) not in models:
            models[m.model, m.head] = build_model(m.model, num_classes, None, m.head)
        plans.append(plan_fields(v, apply_unfreeze(models[m.model, m.head], m.unfreeze, m.unit, m.model)))
    return plans
