"""`--batch-size auto`: the batch with the best training images/s that fits, found by doubling.

The search runs once per run, on the variant that trains the most parameters (the one that needs the
most memory), so every variant then trains with the same batch and the rows stay comparable.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from bench.context import RunContext
from bench.errors import first_line
from bench.inputs import make_loader
from bench.measure import StepTimer, median, synchronize
from bench.settings import Settings
from bench.train import is_out_of_memory
from bench.variant import build_network, fresh_compiler_state, make_trainer
from models import set_train_mode
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
                           "error": first_line(e, 200)})
            break
        if batch == limit:
            break
        batch = min(2 * batch, limit)
    fits = [t for t in trials if t["images_per_s"] is not None]
    if not fits:
        raise torch.OutOfMemoryError(f"--batch-size auto: not even batch {trials[0]['batch_size']} fits")
    return max(fits, key=lambda t: t["images_per_s"])["batch_size"], trials


def trial_step(s: Settings, ctx: RunContext, train: Split, num_classes: int, pretrained) -> Callable[[int], float]:
    """images/s of the training step of `s` at a given batch, on a fresh model each time, built and fed
    as the variant will be (with --feature-cache: from images, through the frozen prefix, the larger
    of the two)."""
    def measure(batch: int) -> float:
        c = s.replace(batch_size=batch)
        if c.speed.compile:
            fresh_compiler_state()  # each batch compiles as the variant will: from a clean state
        network = build_network(c, num_classes, pretrained, ctx.device)
        trainer = make_trainer(c, ctx, network, network.trained, total_steps=TRIAL_WARMUP + TRIAL_STEPS,
                               steps_per_epoch=TRIAL_WARMUP + TRIAL_STEPS)
        loader = make_loader(c, train, ctx.device, train=True)
        set_train_mode(network.model, network.plan, c.model.frozen_bn)
        try:
            timer = StepTimer(ctx.device)
            # The epoch repeats when the split holds fewer batches than the trial's steps.
            batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)),
                                       TRIAL_WARMUP + TRIAL_STEPS)
            for i, (x, y) in enumerate(batches):
                if i >= TRIAL_WARMUP:
                    timer.mark()
                trainer.step(x, y)
            timer.mark()
            synchronize(ctx.device)
            return batch / (median(timer.intervals_ms()) / 1e3)
        finally:
            del network, trainer, loader
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return measure
