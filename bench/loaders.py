"""`python -m bench.loaders`: images/s of each input loader alone, no model, at the run's settings
(same flags as `bench.run`). The same measurement gives every run its `loader_images_per_s`, so a
reader can see whether input keeps up with training."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.files import atomic_write, ensure_writable
from bench.measure import StepTimer, environment, median, synchronize
from pipelines import LOADERS, DataError, Split


def measure_loader(loader, device: torch.device, *, max_batches: int = 50, warmup: int = 3) -> dict:
    """Steady-state images/s of iterating `loader` (first `warmup` batches left out). Each batch is
    reduced on the device so that lazy work really happens before the clock stops."""
    timer = StepTimer(device)
    sink = torch.zeros((), device=device)
    images, counted = 0, 0
    synchronize(device)
    for i, (x, y) in enumerate(loader):
        if i >= warmup + max_batches:
            break
        timer.mark()
        sink += x[:, :, 0, 0].float().sum() + y.sum()  # touches every batch without a host sync
        if i >= warmup:
            images, counted = images + y.shape[0], counted + 1
    timer.mark()
    synchronize(device)
    # Interval k runs from the mark after batch k to the mark after batch k + 1: the fetch of batch
    # k + 1. Batches warmup .. warmup + counted - 1 were counted, so their fetches are intervals
    # warmup - 1 .. warmup + counted - 2 (the interval after the last batch fetched nothing counted).
    intervals = timer.intervals_ms()[warmup - 1:warmup - 1 + counted]
    if not intervals:
        return {"loader_images_per_s": None, "loader_batch_ms_median": None, "loader_batches": 0}
    # The median batch, not the mean: the first batches of a process pay one-off costs (thread pools,
    # kernel selection) that would otherwise dominate a short measurement.
    return {"loader_images_per_s": round(images / counted / (median(intervals) / 1e3), 1),
            "loader_batch_ms_median": round(median(intervals), 3), "loader_batches": counted}


def benchmark(cfg: argparse.Namespace, train: Split, device: torch.device, loaders=LOADERS) -> list[dict]:
    """One row per loader; a loader that cannot be built or fails here (DALI not installed) gets its
    reason as `error` and the others are still measured."""
    from bench.sweep import make_loader  # the sweep's own construction, so the settings are the run's
    rows = []
    for name in loaders:
        try:
            loader = make_loader(argparse.Namespace(**{**vars(cfg), "loader": name}), train, device, train=True)
            rows.append({"loader": name, **measure_loader(loader, device)})
            del loader
        except Exception as e:  # recorded in its row; the next loader is measured all the same
            message = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            rows.append({"loader": name, "loader_images_per_s": None, "loader_batch_ms_median": None,
                         "loader_batches": 0, "error": (message.strip().splitlines() or [type(e).__name__])[0]})
    return rows


def split_own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This command's own flags (`--loaders`, `--json`); the rest are bench.run's."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--loaders", default=",".join(LOADERS))
    own.add_argument("--json", default=None, metavar="PATH")
    return own.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.config import parse_config
    from bench.run import USER_ERRORS, load_splits, resolve_device  # bench.run imports this module
    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        own, rest = split_own_flags(sys.argv[1:] if argv is None else argv)
        names = [n.strip() for n in own.loaders.split(",") if n.strip()]
        unknown = sorted(set(names) - set(LOADERS))
        if unknown or not names:
            raise DataError(f"--loaders {own.loaders!r}: choose from {', '.join(LOADERS)}")
        cfg = parse_config(rest)
        device = resolve_device(cfg.device)
        _, train, _ = load_splits(cfg)
        if own.json:
            ensure_writable(Path(own.json).parent, "--json")
    except USER_ERRORS as e:
        print(f"bench.loaders: error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = benchmark(cfg, train, device, names)
    table = Table(title=f"loaders alone: {cfg.dataset} train split, batch {cfg.batch_size}, {cfg.image_size}px, "
                        f"augment {cfg.augment}, {device.type}")
    for col in ("loader", "images/s", "batch ms (median)", "batches timed", "vs fastest"):
        table.add_column(col, justify="left" if col == "loader" else "right")
    best = max((r["loader_images_per_s"] or 0) for r in rows) or 1.0
    for r in rows:
        ips = r["loader_images_per_s"]
        ms = r["loader_batch_ms_median"]
        table.add_row(r["loader"], f"{ips:,.0f}" if ips else "-", "-" if ms is None else f"{ms:.2f}",
                      str(r["loader_batches"]), f"{(ips or 0) / best:.2f}x")
    console.print(table)
    for r in rows:
        if r.get("error"):
            console.print(f"{r['loader']}: not measured: {r['error']}")
    console.print(f"{time.perf_counter() - started:.1f} s")
    if own.json:
        atomic_write(Path(own.json), json.dumps({"device": device.type, "batch_size": cfg.batch_size,
                                                 "image_size": cfg.image_size, "augment": cfg.augment,
                                                 "env": environment(device), "rows": rows}, indent=2) + "\n")
    return 0 if any(r["loader_images_per_s"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
