"""`--batch-size auto`: the batch with the best training images/s that fits, found by doubling.

The search runs once per run, on the variant that trains the most parameters (the one that needs the
most memory), so every variant then trains with the same batch and the rows stay comparable. Each
candidate trains a few steps on one random batch already on the device (the model's speed, not the
loader's); the doubling stops at the first out-of-memory error or at the limit.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.measure import StepTimer, median, synchronize
from bench.train import Trainer, make_optimizer, make_scheduler
from models import apply_unfreeze, build_model, set_train_mode, split_frozen

START = 16
LIMIT = 4096  # past this, larger batches change the optimisation more than they add speed
TRIAL_WARMUP, TRIAL_STEPS = 2, 3


def search(images_per_s: Callable[[int], float], *, start: int = START, limit: int) -> tuple[int, list[dict]]:
    """Double the batch from `start` up to `limit`; `images_per_s(batch)` raises torch.OutOfMemoryError
    when it does not fit. Returns the fastest batch and every trial ({batch_size, images_per_s | oom})."""
    trials: list[dict] = []
    batch = min(start, limit)
    while batch <= limit:
        try:
            trials.append({"batch_size": batch, "images_per_s": round(images_per_s(batch), 2)})
        except torch.OutOfMemoryError:
            trials.append({"batch_size": batch, "images_per_s": None, "oom": True})
            break
        if batch == limit:
            break
        batch = min(2 * batch, limit)
    fits = [t for t in trials if t["images_per_s"] is not None]
    if not fits:
        raise torch.OutOfMemoryError(f"--batch-size auto: not even batch {trials[0]['batch_size']} fits")
    return max(fits, key=lambda t: t["images_per_s"])["batch_size"], trials


def trial_step(cfg: argparse.Namespace, num_classes: int, pretrained, device: torch.device) -> Callable[[int], float]:
    """images/s of `cfg`'s training step at a given batch, measured on a fresh model each time."""
    def measure(batch: int) -> float:
        model = build_model(cfg.model, num_classes, pretrained[cfg.model, cfg.weights], cfg.head)
        plan = apply_unfreeze(model, cfg.unfreeze, cfg.unit, cfg.model)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=memory_format)
        net = (split_frozen(model) if cfg.split_trunk and cfg.frozen_bn == "eval" else None) or model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, device=device)
        trainer = Trainer(net, device=device, precision=cfg.precision, compile=False, compile_mode=None,
                          optimizer=optimizer, scheduler=make_scheduler("none", optimizer, total_steps=1,
                                                                        steps_per_epoch=1, step_size=1, gamma=1.0))
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device).to(memory_format=memory_format)
        y = torch.randint(0, num_classes, (batch,), device=device)
        set_train_mode(model, plan, cfg.frozen_bn)  # as training runs it: frozen BatchNorm in eval
        try:
            timer = StepTimer(device)
            for i in range(TRIAL_WARMUP + TRIAL_STEPS):
                if i >= TRIAL_WARMUP:
                    timer.mark()
                trainer.step(x, y)
            timer.mark()
            synchronize(device)
            return batch / (median(timer.intervals_ms()) / 1e3)
        finally:
            del model, net, trainer, optimizer, x, y
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return measure
