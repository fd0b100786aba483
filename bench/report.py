"""Rendering at the edge: the live progress display, the results table, and the files a run leaves,
written atomically after every variant so that a run killed at any moment leaves them readable.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.files import atomic_write
from bench.schema import SCHEMA_VERSION, Status
from bench.stats import repeated

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
    ("warmup_peak_mem_bytes", "warm-up mem", lambda v: f"{v / 2**30:.2f} GiB"),
    ("device_peak_mem_bytes", "device mem", lambda v: f"{v / 2**30:.2f} GiB"),
    ("warmup_device_peak_mem_bytes", "warm-up device mem", lambda v: f"{v / 2**30:.2f} GiB"),
    ("mfu", "MFU %", lambda v: f"{100 * v:.1f}"),
    ("compile_s", "compile s", lambda v: f"{v:.1f}"),
    ("top1", "top-1 %", lambda v: f"{v:.2f}"),
    ("top5", "top-5 %", lambda v: f"{v:.2f}"),
    ("gpu_hours", "GPU-h", lambda v: f"{v:.4f}"),
    ("acc_per_gpu_hour", "top-1 / GPU-h", lambda v: f"{v:,.0f}"),
]


# Shown only where some row has one: the device's memory (none on the CPU), the warm-up's peaks (none
# without --warmup-steps, or in rows written before they were measured apart).
OPTIONAL = ("warmup_peak_mem_bytes", "device_peak_mem_bytes", "warmup_device_peak_mem_bytes")


def columns(rows: list[dict]) -> list[tuple]:
    """COLUMNS, less the optional ones no row has."""
    return [c for c in COLUMNS if c[0] not in OPTIONAL or any(r.get(c[0]) is not None for r in rows)]


def what_ran(run: dict) -> str:
    """'resnet50 on cifar100, 224 px': the models and image sizes of every variant, when they differ."""
    models = run.get("models") or [run.get("model")]
    sizes = run.get("image_sizes") or [run.get("image_size")]
    return f"{' / '.join(map(str, models))} on {run.get('dataset')}, {' / '.join(map(str, sizes))} px"


def display_rows(rows: list[dict], aggregates: list[dict] | None) -> list[dict]:
    """What the table shows: every row, or with repeats one line per variant whose figures are the
    aggregates' {mean, std} and whose status counts the seeds that finished."""
    if not aggregates or not repeated(rows):
        return rows
    shown = []
    for a in aggregates:
        status = Status.OK if a["n"] == a["runs"] and not a["failed"] else f"ok {a['n']}/{a['runs']}"
        shown.append({**a, "status": status if a["n"] else next(iter(a["failed"].values()))})
    return shown


def cell(value, fmt) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # an aggregate over seeds
        if value["std"] is None:
            return fmt(value["mean"])
        mean, std = fmt(value["mean"]), fmt(value["std"])
        unit = mean.rpartition(" ")[2]
        if " " in mean and std.endswith(" " + unit):  # 1.04 ± 0.11 GiB, not 1.04 GiB ± 0.11 GiB
            mean = mean.rpartition(" ")[0]
        return f"{mean} ± {std}"
    return fmt(value)


def results_table(rows: list[dict], title: str, device_hours_label: str = "GPU-h",
                  aggregates: list[dict] | None = None) -> Table:
    table = Table(title=title)
    shown_rows = display_rows(rows, aggregates)
    names = max((len(str(r.get("variant", ""))) for r in shown_rows), default=7)
    shown = columns(rows)
    for key, header, _ in shown:
        header = header.replace("GPU-h", device_hours_label)
        table.add_column(header, justify="left" if key in ("variant", "unfreeze", "status") else "right",
                         min_width=names if key == "variant" else None)  # variant names whole, never cut
    for row in shown_rows:
        cells = [cell(row.get(key), fmt) for key, _, fmt in shown]
        if row.get("status") != Status.OK:
            cells[3] = f"[red]{row.get('status')}[/red]"
        table.add_row(*cells)
    return table


def _flat(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if key == "history":
            continue  # per-epoch detail lives in results.json
        flat[key] = ";".join(map(str, value)) if isinstance(value, list) else value
    return flat


def write_results(out: Path, run: dict, rows: list[dict], aggregates: list[dict] | None = None) -> None:
    """results.json (with the aggregates over seeds) and results.csv (one flat row per variant and seed,
    no history)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": SCHEMA_VERSION, "run": run, "rows": rows, "aggregates": aggregates or []}
    atomic_write(out / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write(out / "results.csv", buffer.getvalue())


@contextlib.contextmanager
def step_progress(console: Console, description: str):
    """A progress bar for one long task; yields `update(done, total)`."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


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

    def update(self, *, variant, epoch: int, epochs: int, step: int, steps: int, images: int,
               done: int, total: int) -> None:
        """`step` of `steps` in `epoch`; `done` of `total` steps in the variant (the bar)."""
        now = time.perf_counter()
        if variant is not self._variant:
            self._variant, self._done = variant, self._done + 1
            self._task = self.progress.add_task(variant.name, total=total, rate="")
        if step == 1:
            self._started = now
        if now - self._last < 0.25 and step != steps and done != total:
            return  # redraw at most 4 times a second
        self._last = now
        rate = (images / (now - self._started)) if now > self._started else 0.0
        self.progress.update(self._task, completed=done,
                             description=f"[{self._done}/{self.total_variants}] {variant.name}  "
                                         f"epoch {epoch}/{epochs}  step {step}/{steps}",
                             rate=f"{rate:,.0f} img/s")


def trace_table(row: dict, top: int = 5) -> Table | None:
    """One variant's trace summary: the top operators (kernels on CUDA) by device time, idle share."""
    summary = row.get("trace")
    if not summary:
        return None
    where = "GPU kernels" if summary["device"] == "cuda" else "CPU operators (self time)"
    idle = "-" if summary["idle_pct"] is None else f"{summary['idle_pct']:.1f}%"
    table = Table(title=f"{row['variant']}: top {where} over {summary['steps']} traced steps; "
                        f"device idle {idle}", title_justify="left")
    for col in ("operator", "calls", "ms", "% of device time"):
        table.add_column(col, justify="left" if col == "operator" else "right", overflow="fold")
    for op in summary["top"][:top]:
        table.add_row(op["name"][:90], str(op["calls"]), f"{op['total_ms']:.2f}", f"{op['pct']:.1f}")
    return table


def decision_lines(run: dict) -> list[str]:
    """The pick and the paired comparisons, as Markdown lines (empty without accuracy)."""
    lines = []
    pick = run.get("recommendation")
    if pick:
        hours = "GPU-hours" if str(run.get("device_used", "")).startswith("cuda") else "device-hours"
        points = f"{pick['tolerance']:g} point{'' if pick['tolerance'] == 1 else 's'}"
        lines += ["", "## The depth to pick", "", pick["sentence"],
                  "", f"Frontier of {hours} against top-1 (no other variant is cheaper and at least as accurate): "
                      f"{', '.join(pick['frontier'])}. Tolerance {points} (--tolerance)."]
    if run.get("comparisons"):
        lines += ["", "| from | to | top-1 change (points) | 95 % interval | seeds | distinguishable |",
                  "|---|---|---|---|---|---|"]
        for c in run["comparisons"]:
            lo, hi = c["ci95"]
            lines.append(f"| {c['from']} | {c['to']} | {c['mean']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {len(c['seeds'])} | "
                         f"{'yes' if c['distinguishable'] else 'no'} |")
    return lines


def comparison_lines(run: dict) -> list[str]:
    """The paired comparisons for the terminal, one line each."""
    return [f"{c['to']} vs {c['from']}: top-1 {c['mean']:+.2f} points [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] over "
            f"{len(c['seeds'])} seeds, {'distinguishable from zero' if c['distinguishable'] else 'within the noise'}"
            for c in run.get("comparisons") or []]


def render_text(renderable, width: int = 240) -> str:
    """A rich renderable as plain text (the saved copy of the terminal table)."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|")


def markdown_report(run: dict, rows: list[dict], plots: list[Path], evaluation: dict | None, out: Path,
                    aggregates: list[dict] | None = None) -> str:
    """`report.md`: the results table, the plots, the trace summaries with links, the best variant's
    evaluation. Paths are relative to `out`, so the folder can be moved or zipped whole."""
    env = run.get("env", {})
    hours = "GPU-h" if str(run.get("device_used", "")).startswith("cuda") else "device-h"
    shown = columns(rows)
    lines = [f"# {run.get('profile')}: {what_ran(run)}",
             "",
             f"{run.get('train_images')} training / {run.get('eval_images')} {run.get('eval_on')} images; "
             f"{run.get('precision')}, batch {run.get('batch_size')}, loader {run.get('loader')}; "
             f"{env.get('device')} ({run.get('device_used')}); torch {env.get('torch')}, "
             f"torchvision {env.get('torchvision')}, DALI {env.get('dali')}; started {run.get('started_utc')}.",
             "", "## Results", "",
             "| " + " | ".join(h.replace("GPU-h", hours) for _, h, _ in shown) + " |",
             "|" + "---|" * len(shown)]
    for row in display_rows(rows, aggregates):
        lines.append("| " + " | ".join(_md_cell(cell(row.get(k), fmt)) for k, _, fmt in shown) + " |")
    if aggregates and repeated(rows):
        lines += ["", f"Each line is the mean ± standard deviation over the seeds that finished "
                      f"({', '.join(str(a['variant']) + ': ' + str(a['n']) for a in aggregates)}); every seed's "
                      f"row is in "
                      f"results.json."]
    failed = [r for r in rows if r.get("status") != Status.OK]
    if failed:
        lines += [""] + [f"- `{r['variant']}` (seed {r.get('seed')}): {r['status']}: {r.get('error')}" for r in failed]
    lines += decision_lines(run)
    lines += ["", "Full figures: [results.json](results.json), [results.csv](results.csv); "
                  "the terminal table: [table.txt](table.txt)."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    traced = [r for r in rows if r.get("trace")]
    if traced:
        lines += ["", "## Profiler traces", "",
                  "Open them with `tensorboard --logdir " + str(run.get("trace_dir", "traces")) +
                  "` (PyTorch Profiler tab).", "",
                  "| variant | traced steps | device idle % | top operator | its share % | layout copies | trace |",
                  "|---|---|---|---|---|---|---|"]
        for r in traced:
            t = r["trace"]
            top = t["top"][0] if t["top"] else {"name": "-", "pct": 0}
            try:
                link = Path(t["file"]).resolve().relative_to(out.resolve()).as_posix()
            except ValueError:
                link = t["file"]
            lines.append(f"| {r['variant']} | {t['steps']} | {t['idle_pct']} | `{_md_cell(top['name'][:60])}` | "
                         f"{top['pct']} | {t['layout_copies']} | [{Path(t['file']).name}]({link}) |")
    if evaluation:
        base = Path(evaluation["dir"]).resolve().relative_to(out.resolve()).as_posix()
        lines += ["", f"## Evaluation of the best variant: {evaluation.get('variant')}", "",
                  f"top-1 {evaluation['top1']:.2f}%, top-5 {evaluation['top5']:.2f}% on {evaluation['images']} "
                  f"{evaluation.get('split')} images. "
                  f"[classification report]({base}/classification_report.csv)", "",
                  f"![confusion matrix]({base}/confusion_matrix.png)", "",
                  f"![predictions]({base}/predictions.png)"]
    return "\n".join(lines) + "\n"


