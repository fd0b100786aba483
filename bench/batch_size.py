"""`--batch-size auto`: the batch with the best training images/s that fits, found by doubling.

The search runs once per run, on the variant that trains the most parameters (the one that needs the
most memory), so every variant then trains with the same batch and the rows stay comparable. Each
candidate runs the real training step a few times: the run's loader (its dtype, layout and memory),
its precision, and `--compile` as the run will compile. The doubling stops at the first failure for
lack of memory, whichever library reports it (torch, cuBLAS, cuDNN, DALI), or at the limit.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch

from bench.measure import StepTimer, median, synchronize
from bench.sweep import fresh_compiler_state, make_loader
from bench.train import Trainer, is_out_of_memory, make_optimizer, make_scheduler
from models import apply_unfreeze, build_model, set_train_mode, split_frozen
from pipelines import Split

START = 16
LIMIT = 4096  # past this, larger batches change the optimisation more than they add speed
TRIAL_WARMUP, TRIAL_STEPS = 2, 3


def search(images_per_s: Callable[[int], float], *, start: int = START, limit: int) -> tuple[int, list[dict]]:
    """Double the batch from `start` up to `limit`; `images_per_s(batch)` raises an out-of-memory error
    (see `bench.train.is_out_of_memory`) when it does not fit; any other error propagates. Returns the
    fastest batch and every trial ({batch_size, images_per_s | oom, error})."""
    trials: list[dict] = []
    batch = min(start, limit)
    while batch <= limit:
        try:
            trials.append({"batch_size": batch, "images_per_s": round(images_per_s(batch), 2)})
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            trials.append({"batch_size": batch, "images_per_s": None, "oom": True,
                           "error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]})
            break
        if batch == limit:
            break
        batch = min(2 * batch, limit)
    fits = [t for t in trials if t["images_per_s"] is not None]
    if not fits:
        raise torch.OutOfMemoryError(f"--batch-size auto: not even batch {trials[0]['batch_size']} fits")
    return max(fits, key=lambda t: t["images_per_s"])["batch_size"], trials


def trial_step(cfg: argparse.Namespace, train: Split, num_classes: int, pretrained,
               device: torch.device) -> Callable[[int], float]:
    """images/s of `cfg`'s training step at a given batch, on a fresh model each time, fed by the run's
    loader (with --feature-cache: from images, through the frozen prefix, the larger of the two)."""
    def measure(batch: int) -> float:
        c = argparse.Namespace(**{**vars(cfg), "batch_size": batch})
        if c.compile:
            fresh_compiler_state()  # each batch compiles as the variant will: from a clean state
        model = build_model(c.model, num_classes, pretrained[c.model, c.weights], c.head)
        plan = apply_unfreeze(model, c.unfreeze, c.unit, c.model)
        model = model.to(device, memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
        net = (split_frozen(model) if c.split_trunk and c.frozen_bn == "eval" else None) or model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(c.optimizer, params, lr=c.lr, weight_decay=c.weight_decay,
                                   momentum=c.momentum, device=device)
        trainer = Trainer(net, device=device, precision=c.precision, compile=c.compile, compile_mode=c.compile_mode,
                          compile_backend=c.compile_backend, optimizer=optimizer,
                          scheduler=make_scheduler("none", optimizer, total_steps=1, steps_per_epoch=1,
                                                   step_size=1, gamma=1.0))
        loader = make_loader(c, train, device, train=True)
        set_train_mode(model, plan, c.frozen_bn)  # as training runs it: frozen BatchNorm in eval
        try:
            timer = StepTimer(device)
            # The epoch repeats when the split holds fewer batches than the trial's steps.
            batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)),
                                       TRIAL_WARMUP + TRIAL_STEPS)
            for i, (x, y) in enumerate(batches):
                if i >= TRIAL_WARMUP:
                    timer.mark()
                trainer.step(x, y)
            timer.mark()
            synchronize(device)
            return batch / (median(timer.intervals_ms()) / 1e3)
        finally:
            del model, net, trainer, optimizer, loader
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return measure
