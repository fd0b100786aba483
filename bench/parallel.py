"""The sweep on several processes under torchrun, in the two ways `--parallel` names.

- `data` (default): every rank trains the same variant, DDP over its trainable part; the ranks' rows
  are merged into one (`merge_rank_rows`). The ranks run in lockstep, so a variant that fails on one
  rank ends the run (`RankFailure`): the others wait inside a collective it will never join.
- `variants`: each rank claims variants from a counter in torchrun's store and trains them alone.
  No rank waits for another inside a collective, so variants of very different lengths cannot run
  into the process-group timeout, and a failed variant is an `error` row, as on one process.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench import distributed
from bench.checkpoint import save_checkpoint
from bench.distributed import Dist, all_gather_objects
from bench.errors import ConfigError
from bench.schema import TRAINED, Status
from bench.settings import Settings

# How the ranks' values of one variant combine. Rates add up (each rank processes its own images at
# the same time); times and memory are the slowest or largest rank's (the step waits for it).
SUMMED = ("images_per_s", "tail_images_per_s", "eval_images_per_s", "achieved_tflops")
LARGEST = ("peak_mem_bytes", "device_peak_mem_bytes", "warmup_peak_mem_bytes", "warmup_device_peak_mem_bytes",
           "step_ms_median", "data_wait_pct", "compile_s", "compile_cache_hits", "compile_cache_misses", "train_s",
           "wall_s", "gpu_hours", "train_acc_s", "feature_cache_s", "trace_export_s")
AVERAGED = ("mfu",)  # a share of each device's ceiling: the mean over devices
PER_RANK = ("peak_mem_bytes", "device_peak_mem_bytes", "images_per_s")


class RankFailure(RuntimeError):
    """Under --parallel data a variant failed on this rank; the run stops (exit 1). `details`: the
    variant's traceback, when it raised."""

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details


def check_config(s: Settings, d: Dist) -> None:
    """Settings that cannot work on several ranks, refused before anything starts."""
    if d.world_size == 1 or s.output.parallel != "data":
        return
    if s.train.oom == "retry":
        raise ConfigError("--oom retry would halve the batch on the rank that ran out of memory only; under "
                          "torchrun use --oom fail with --parallel data, or --parallel variants")
    if s.train.batch_size == "auto":
        raise ConfigError("--batch-size auto searches each rank's device on its own and the ranks could "
                          "disagree; give --batch-size N (per rank) with --parallel data")
    if s.speed.breakdown:  # its phases run the bare model, whose gradients DDP's hooks would try to reduce
        raise ConfigError("--breakdown times one process's step; use --parallel variants (or one process) for it")
    if s.speed.feature_cache:
        raise ConfigError("--feature-cache is not sharded across ranks; use --no-feature-cache with "
                          "--parallel data, or --parallel variants")


def check_sizes(s: Settings, d: Dist, train_images: int, eval_images: int) -> None:
    """Under --parallel data: every rank needs at least one full batch and one evaluation image."""
    batch = s.train.batch_size
    if d.world_size == 1 or s.output.parallel != "data":
        return
    if train_images // d.world_size < batch:
        raise ConfigError(f"--batch-size {batch} per rank x {d.world_size} ranks = global batch "
                          f"{batch * d.world_size} is larger than the {train_images} training images")
    if eval_images < d.world_size:
        raise ConfigError(f"{eval_images} evaluation images cannot be shared by {d.world_size} ranks")


def data_parallel_width(run: dict) -> int:
    """Devices that trained each variant of a saved run (`results.json`'s `run`)."""
    return int(run.get("world_size") or 1) if run.get("parallel", "data") == "data" else 1


def check_resume(out: Path, s: Settings, d: Dist) -> None:
    """A resumed run's new rows must share the saved rows' global batch: the same data-parallel width."""
    try:
        saved = data_parallel_width(json.loads((out / "results.json").read_text())["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # prepare_out has already said what is wrong with the file
    now = d.world_size if s.output.parallel == "data" else 1
    if saved != now:
        raise ConfigError(f"--resume {out}: its variants trained on {saved} device(s) each (--parallel data), "
                          f"this run would train them on {now}; resume with the same torchrun world size, "
                          f"or start a new run")


# --parallel data

def merge_rank_rows(rows: list[dict]) -> dict:
    """One row from every rank's row of a variant (in rank order). Accuracy, loss and the plan are the
    same on every rank (evaluation is all-reduced), so rank 0's are kept; per-epoch training loss is
    averaged (every rank saw as many images)."""
    merged = dict(rows[0])

    def present(key: str) -> bool:
        return all(isinstance(r.get(key), (int, float)) for r in rows)
    for key in SUMMED:
        if present(key):
            merged[key] = round(sum(r[key] for r in rows), 4)
    for key in LARGEST:
        if present(key):
            merged[key] = max(r[key] for r in rows)
    for key in AVERAGED:
        if present(key):
            merged[key] = round(sum(r[key] for r in rows) / len(rows), 4)
    for key in PER_RANK:
        merged[f"{key}_per_rank"] = [r.get(key) for r in rows]
    if isinstance(merged.get("top1"), (int, float)) and merged.get("gpu_hours"):
        merged["acc_per_gpu_hour"] = round(merged["top1"] / merged["gpu_hours"], 2)
    histories = [r.get("history") or [] for r in rows]
    if all(len(h) == len(histories[0]) for h in histories):
        merged["history"] = [
            {**epoch, "train_loss": round(sum(h[i]["train_loss"] for h in histories) / len(rows), 5)}
            if all("train_loss" in h[i] for h in histories) else epoch
            for i, epoch in enumerate(histories[0])]
    merged["world_size"] = len(rows)
    if isinstance(merged.get("batch_size"), int):
        merged["global_batch_size"] = merged["batch_size"] * len(rows)
    # fp32 parameters: 4 bytes each
    merged["ddp_bucket_cap_mb"] = distributed.bucket_cap_mb(4 * merged.get("trainable_params", 0))
    return merged


def combine_loader_speeds(speeds: list[dict]) -> dict:
    """`bench.loaders.measure_loader` of every rank at once: images/s summed, the slowest batch time."""
    rates = [s.get("loader_images_per_s") for s in speeds]
    times = [s.get("loader_batch_ms_median") for s in speeds]
    return {**speeds[0],
            "loader_images_per_s": round(sum(rates), 1) if None not in rates else None,
            "loader_batch_ms_median": max(times) if None not in times else None,
            "loader_images_per_s_per_rank": rates}


class DataParallelRows:
    """`on_row` for run_sweep under --parallel data: the ranks' rows of a variant merged on every rank
    (so every rank holds the same results, e.g. to pick the --final-best variant). A rank whose variant
    did not finish gathers nothing (the others may be blocked in a collective it will never join): it
    records its row and raises RankFailure; its exit makes the waiting ranks' collectives fail."""

    def __init__(self, d: Dist, on_row: Callable[[dict], None]):
        self.dist, self.on_row = d, on_row

    def __call__(self, row: dict) -> None:
        if row["status"] in TRAINED:
            self.on_row(merge_rank_rows(all_gather_objects(row)))
            return
        peer = _peer_failure(row)
        if peer:  # not this rank's own failure: a collective broke because another rank stopped first
            row = {**row, "status": Status.INTERRUPTED, "traceback": None,
                   "error": f"stopped because another rank failed ({row['error']})"}
        self.on_row({**row, "world_size": self.dist.world_size, "rank": self.dist.rank})
        if row["status"] == Status.INTERRUPTED and not peer:
            return  # Ctrl-C / SIGTERM on this rank: run_sweep raises it on
        raise RankFailure(f"rank {self.dist.rank}: variant {row['variant']}: {row['status']}: {row['error']}",
                          row.get("traceback"))


def _peer_failure(row: dict) -> bool:
    """An error raised by a collective because a peer went away (its sockets closed, or it timed out)."""
    error = row.get("error") or ""
    return error.startswith(("DistBackendError", "DistNetworkError", "DistStoreError")) or \
        "another rank failed" in error or "Connection closed by peer" in error or "Connection reset by peer" in error


# --parallel variants

class VariantQueue:
    """Variants handed out through an atomic counter in torchrun's store; rank 0's `collect()` hands
    each published row to `on_row` once."""

    POLL_S = 0.5

    def __init__(self, n: int, on_row: Callable[[dict], None] | None):
        self.n, self.on_row = n, on_row
        self.store = distributed.store()
        self.seen: set[int] = set()

    def claim(self) -> int | None:
        i = self.store.add("next", 1) - 1
        return i if i < self.n else None

    def publish(self, i: int, row: dict) -> None:
        self.store.set(f"row/{i}", json.dumps(row, default=str))

    def collect(self, *, wait: bool) -> None:
        """Every newly published row to `on_row`; with `wait`, until all `n` are in (a rank that dies
        makes torchrun stop this one too, so the wait cannot outlive the job)."""
        while True:
            for i in range(self.n):
                if i not in self.seen and self.store.check([f"row/{i}"]):
                    self.seen.add(i)
                    self.on_row(json.loads(self.store.get(f"row/{i}")))
            if not wait or len(self.seen) == self.n:
                return
            time.sleep(self.POLL_S)


def run_variant_queue(d: Dist, todo: list, run_one: Callable[[object, Callable[[dict], None]], None],
                      on_row: Callable[[dict], None]) -> None:
    """--parallel variants: claim, train, publish until the queue is empty; rank 0 then waits for the
    other ranks' rows. `run_one(job, on_row)` trains one job of `todo` (a variant with a seed)."""
    queue = VariantQueue(len(todo), on_row if d.is_main else None)

    def publish(i: int):
        def done(row: dict) -> None:
            queue.publish(i, {**row, "rank": d.rank, "world_size": 1})
            if d.is_main:
                queue.collect(wait=False)
        return done
    try:
        while (i := queue.claim()) is not None:
            run_one(todo[i], publish(i))
    except KeyboardInterrupt:
        if d.is_main:
            queue.collect(wait=False)  # what the other ranks finished before the stop
        raise
    if d.is_main:
        queue.collect(wait=True)


class CandidateCheckpoints:
    """Checkpoints under --parallel variants: the rank that trained a variant holds its weights, so it
    saves them itself (the output directory must be one every rank sees): `<variant>.pt` with
    --save-checkpoint, else a hidden candidate. Rank 0 promotes the best row's file to best.pt once
    every row is in (`promote`), and removes the other candidates."""

    def __init__(self, folder: Path, keep_all: bool, classes: list[str]):
        self.folder, self.keep_all, self.classes = folder, keep_all, classes

    def path(self, variant: str) -> Path:
        return self.folder / (f"{variant}.pt" if self.keep_all else f".candidate-{variant}.pt")

    def on_trained(self, model, row: dict, settings: Settings) -> None:
        save_checkpoint(self.path(row["variant"]), model, settings=settings.study(), row=row, classes=self.classes)

    def promote(self, best: dict | None, best_path: Path, trained: set[str]) -> None:
        """`best`: the best row of the whole run; `trained`: variants trained in this run (a kept row
        from a resumed run already owns best.pt)."""
        if best is not None and best["variant"] in trained and self.path(best["variant"]).exists():
            source = self.path(best["variant"])
            (shutil.copyfile if self.keep_all else shutil.move)(source, best_path)
        for stale in self.folder.glob(".candidate-*.pt"):
            stale.unlink(missing_ok=True)
