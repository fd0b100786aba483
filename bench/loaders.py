"""`python -m bench.loaders`: images/s of each input loader alone, no model, at the run's settings
(same flags as `bench.run`). The same measurement gives every run its `loader_images_per_s`, so a
reader can see whether input keeps up with training."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.config import parse_config
from bench.errors import USER_ERRORS, first_line
from bench.files import atomic_write, ensure_writable
from bench.inputs import load_splits, make_loader, resolve_device
from bench.measure import environment, measure_loader
from bench.settings import Settings
from pipelines import LOADERS, DataError, Split


def dali_last(names: list[str]) -> list[str]:
    """DALI after the others: a crash or a hang in it (native code, its own threads) must not cost the
    rows of the loaders measured before it."""
    return [n for n in names if n != "dali"] + [n for n in names if n == "dali"]


def benchmark(s: Settings, train: Split, device: torch.device, loaders=LOADERS) -> Iterator[dict]:
    """One row per loader as it is measured, built as the run builds it; a loader that cannot be built
    or fails here (DALI not installed) gets its reason as `error` and the others are still measured.
    DALI goes last whatever the order asked for."""
    for name in dali_last(list(loaders)):
        try:
            loader = make_loader(s.replace(loader=name), train, device, train=True)
            row = {"loader": name, **measure_loader(loader, device)}
            del loader
        except Exception as e:  # recorded in its row; the next loader is measured all the same
            message = first_line(e) if isinstance(e, DataError) else f"{type(e).__name__}: {first_line(e)}"
            row = {"loader": name, "loader_images_per_s": None, "loader_batch_ms_median": None,
                   "loader_batches": 0, "error": message}
        yield row


def write_json(path: Path, s: Settings, device: torch.device, env: dict, rows: list[dict]) -> None:
    atomic_write(path, json.dumps({"device": device.type, "batch_size": s.train.batch_size,
                                   "image_size": s.data.image_size, "augment": s.data.augment, "env": env,
                                   "rows": rows}, indent=2) + "\n")


def split_own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This command's own flags (`--loaders`, `--json`); the rest are bench.run's."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--loaders", default=",".join(LOADERS))
    own.add_argument("--json", default=None, metavar="PATH")
    return own.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        own, rest = split_own_flags(sys.argv[1:] if argv is None else argv)
        names = [n.strip() for n in own.loaders.split(",") if n.strip()]
        unknown = sorted(set(names) - set(LOADERS))
        if unknown or not names:
            raise DataError(f"--loaders {own.loaders!r}: choose from {', '.join(LOADERS)}")
        s = parse_config(rest).settings
        device = resolve_device(s.speed.device)
        _, train, _ = load_splits(s)
        if own.json:
            ensure_writable(Path(own.json).parent, "--json")
    except USER_ERRORS as e:
        print(f"bench.loaders: error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    env, rows = environment(device), []
    for row in benchmark(s, train, device, names):
        rows.append(row)
        if own.json:  # after every loader: a later one that crashes the process leaves these rows
            write_json(Path(own.json), s, device, env, rows)
    table = Table(title=f"loaders alone: {s.data.dataset} train split, batch {s.train.batch_size}, "
                        f"{s.data.image_size}px, augment {s.data.augment}, {device.type}")
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
    return 0 if any(r["loader_images_per_s"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
