"""Rendering at the edge: the live progress display, the results table, and the files a run leaves.

Files are written atomically (temporary file + `os.replace`) after every variant, so a run killed at
any moment leaves every finished variant readable.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.schema import SCHEMA_VERSION

# (key, header, format) for the terminal table; README.md explains each column.
COLUMNS = [
    ("variant", "variant", str),
    ("unfreeze", "unfreeze", str),
    ("trainable_params", "trainable", lambda v: f"{v / 1e6:.2f}M"),
    ("status", "status", str),
    ("images_per_s", "img/s", lambda v: f"{v:,.0f}"),
    ("eval_images_per_s", "eval img/s", lambda v: f"{v:,.0f}"),
    ("step_ms_median", "step ms", lambda v: f"{v:.1f}"),
    ("data_wait_pct", "data wait %", lambda v: f"{v:.1f}"),
    ("peak_mem_bytes", "peak mem", lambda v: f"{v / 2**30:.2f} GiB"),
    ("compile_s", "compile s", lambda v: f"{v:.1f}"),
    ("top1", "top-1 %", lambda v: f"{v:.2f}"),
    ("top5", "top-5 %", lambda v: f"{v:.2f}"),
    ("gpu_hours", "GPU-h", lambda v: f"{v:.4f}"),
    ("acc_per_gpu_hour", "top-1 / GPU-h", lambda v: f"{v:,.0f}"),
]


def results_table(rows: list[dict], title: str, device_hours_label: str = "GPU-h") -> Table:
    table = Table(title=title)
    for key, header, _ in COLUMNS:
        header = header.replace("GPU-h", device_hours_label)
        table.add_column(header, justify="left" if key in ("variant", "unfreeze", "status") else "right")
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt(value))
        if row.get("status") != "ok":
            cells[3] = f"[red]{row.get('status')}[/red]"
        table.add_row(*cells)
    return table


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _flat(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if key == "history":
            continue  # per-epoch detail lives in results.json
        flat[key] = ";".join(map(str, value)) if isinstance(value, list) else value
    return flat


def write_results(out: Path, run: dict, rows: list[dict]) -> None:
    """results.json (`{"run": ..., "depths": [...]}`) and results.csv (one flat row per variant)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": SCHEMA_VERSION, "run": run, "depths": rows}
    _atomic_write(out / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    _atomic_write(out / "results.csv", buffer.getvalue())


class LiveProgress:
    """A rich progress bar per variant: epoch, step and host-clock images/s (display only: the host
    runs ahead of the GPU, so the figures that count are the synchronised ones in the results)."""

    def __init__(self, console: Console, total_variants: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                                 transient=False)
        self.total_variants, self._done = total_variants, 0
        self._task, self._variant, self._started, self._last = None, None, 0.0, 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, *, variant, epoch: int, epochs: int, step: int, steps: int, images: int) -> None:
        now = time.perf_counter()
        if variant is not self._variant:
            self._variant, self._done = variant, self._done + 1
            self._task = self.progress.add_task(variant.name, total=steps * epochs, rate="")
        if step == 1:
            self._started = now
        if now - self._last < 0.25 and step != steps:
            return  # redraw at most 4 times a second
        self._last = now
        rate = (images / (now - self._started)) if now > self._started else 0.0
        self.progress.update(self._task, completed=(epoch - 1) * steps + step,
                             description=f"[{self._done}/{self.total_variants}] {variant.name}  "
                                         f"epoch {epoch}/{epochs}  step {step}/{steps}",
                             rate=f"{rate:,.0f} img/s")
