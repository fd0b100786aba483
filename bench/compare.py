"""`python -m bench.compare A B [C ...]`: the figures of two or more runs side by side, with each one's
ratio to the first (two GPUs, two software versions, before and after a change).

A folder is a run (`results.json`, from bench.run) or a GPU suite (`suite.json` and
`part-N/runs/<step>/results.json`, or one part's folder with `runs/<step>/results.json`, from
bench.suite); suites are compared step by step. Runs whose model,
image size, batch size or precision differ measure different things, so they are refused (naming each
difference) unless `--force`. `--fail-below RATIO` turns a training or evaluation images/s below RATIO
times the first folder's, or a variant the first folder finished and a later one did not, into exit
code 1, for CI.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.args import Parser, positive_float
from bench.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, first_line
from bench.files import atomic_write
from bench.report import COLUMNS
from bench.schema import TRAINED, saved_rows

GROUPS = {"speed": ("images_per_s", "eval_images_per_s", "step_ms_median", "data_wait_pct"),
          "memory": ("peak_mem_bytes", "warmup_peak_mem_bytes", "device_peak_mem_bytes",
                     "warmup_device_peak_mem_bytes"),
          "efficiency": ("mfu", "gpu_hours", "acc_per_gpu_hour", "wall_s"),
          "accuracy": ("top1", "top5")}
FIGURES = [f for figures in GROUPS.values() for f in figures]
HIGHER_IS_BETTER = {"images_per_s", "eval_images_per_s", "mfu", "acc_per_gpu_hour", "top1", "top5"}
GATED = ("images_per_s", "eval_images_per_s")  # what --fail-below checks
# The results table's headers and formats, so a figure reads the same here as in bench.run's table.
SHOWN = {key: (header, fmt) for key, header, fmt in COLUMNS} | {"wall_s": ("wall s", lambda v: f"{v:,.1f}")}
# What makes two runs' figures incomparable: another model, image size, batch size or precision.
COMPARABLE = {"model": lambda run: run.get("models") or [run.get("model")],
              "image_size": lambda run: run.get("image_sizes") or [run.get("image_size")],
              "batch_size": lambda run: run.get("batch_size"),
              "precision": lambda run: run.get("precision")}


@dataclass
class Folder:
    label: str                          # A, B, C ... in the table's columns
    path: Path
    suite: bool
    runs: dict[str, dict]               # step ("" in a run folder) -> the run's settings (results.json's `run`)
    values: dict[str, dict[str, float]]  # item (`variant`, or `step/variant` in a suite) -> figure -> value
    counts: dict[str, int]              # item -> how many rows or seeds its values average
    unfinished: dict[str, str]          # item -> status, for variants with no finished row


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path, folder: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: no readable {path.name} ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{folder}: {path.name} is not a JSON object")
    return doc


def run_figures(doc: dict, prefix: str, folder: Folder) -> None:
    """One results.json into `folder`: a variant's value is the mean over its finished rows (one per
    seed, say), or the mean of its aggregate over seeds where the run has one."""
    finished: dict[str, list[dict]] = {}
    for row in saved_rows(doc):
        if row["status"] in TRAINED:
            finished.setdefault(prefix + row["variant"], []).append(row)
        else:
            folder.unfinished[prefix + row["variant"]] = row["status"]
    for item, rows in finished.items():
        folder.values[item] = {f: sum(v) / len(v) for f in FIGURES
                               if (v := [r[f] for r in rows if number(r.get(f))])}
        folder.counts[item] = len(rows)
    for agg in doc.get("aggregates") or []:
        item = prefix + agg["variant"]
        means = {f: agg[f]["mean"] for f in FIGURES if isinstance(agg.get(f), dict) and number(agg[f].get("mean"))}
        if int(agg["n"]) and means:  # n 0: no seed finished, and the rows say why
            folder.values[item] = {**folder.values.get(item, {}), **means}
            folder.counts[item] = int(agg["n"])
    for item in folder.values:
        folder.unfinished.pop(item, None)


def load(label: str, path: Path) -> Folder:
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder")
    suite = (path / "suite.json").exists()
    folder = Folder(label, path, suite, {}, {}, {}, {})
    try:
        if suite:
            named = [s.get("name") for s in read_json(path / "suite.json", path).get("steps") or []
                     if isinstance(s, dict)]
            # a single part's folder holds runs/<step>/; a merged suite's, part-N/runs/<step>/
            found = {p.parent.name: p for p in [*path.glob("part-*/runs/*/results.json"),
                                                *path.glob("runs/*/results.json")]}
            steps = [s for s in named if s in found] + sorted(set(found) - set(named))  # the suite's order
            if not steps:
                raise ConfigError(f"{path}: a suite folder with no runs/<step>/results.json")
        else:
            steps, found = [""], {"": path / "results.json"}
        for step in steps:
            doc = read_json(found[step], path)
            if not isinstance(doc["run"], dict):
                raise TypeError("'run' is not an object")
            folder.runs[step] = doc["run"]
            run_figures(doc, f"{step}/" if step else "", folder)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{path}: not a bench.run results.json ({type(e).__name__}: {first_line(e)})") from None
    return folder


def differences(folders: list[Folder]) -> list[str]:
    """Each setting in COMPARABLE where a folder's run differs from the first folder's (step by step)."""
    first, found = folders[0], []
    for folder in folders[1:]:
        for step, run in folder.runs.items():
            if step not in first.runs:
                continue
            for name, setting in COMPARABLE.items():
                mine, theirs = setting(run), setting(first.runs[step])
                if mine != theirs:
                    found.append(f"{folder.path}{' ' + step if step else ''}: {name} {show(mine)}, "
                                 f"{first.path}: {show(theirs)}")
    return found


def show(setting) -> str:
    return "/".join(map(str, setting)) if isinstance(setting, list) else str(setting)


def ratio(first, value) -> float | None:
    return value / first if first and value is not None else None


def describe(folder: Folder) -> str:
    env = next(iter(folder.runs.values())).get("env")
    env = env if isinstance(env, dict) else {}
    return f"{folder.label}: {folder.path} ({env.get('device')}, torch {env.get('torch')})"


def table(folders: list[Folder], items: list[str], threshold: float | None) -> Table:
    """One row per (figure, item), the figures in groups; each folder's value, and each later folder's
    ratio to the first. Ratios under --fail-below are red."""
    first = folders[0]
    cuda = any(str(run.get("device_used", "")).startswith("cuda") for f in folders for run in f.runs.values())
    out = Table(title="\n".join(map(describe, folders)), title_justify="left")
    out.add_column("group")
    out.add_column("figure")
    out.add_column("step/variant" if first.suite else "variant")
    for folder in folders:
        out.add_column(folder.label, justify="right")
        if folder is not first:
            out.add_column(f"{folder.label}/{first.label}", justify="right")
    for group, figures in GROUPS.items():
        group_shown = False
        for figure in figures:
            header, fmt = SHOWN[figure]
            header = header if cuda else header.replace("GPU-h", "device-h")  # bench.run's word on a CPU
            shown = [i for i in items if any(figure in f.values[i] for f in folders)]
            for n, item in enumerate(shown):
                cells = ["" if group_shown else group,
                         "" if n else f"{header} {'↑' if figure in HIGHER_IS_BETTER else '↓'}", escape(item)]
                group_shown = True
                for folder in folders:
                    value = folder.values[item].get(figure)
                    count = folder.counts[item]
                    cells.append("-" if value is None else fmt(value) + (f" (n={count})" if count > 1 else ""))
                    if folder is not first:
                        r = ratio(first.values[item].get(figure), value)
                        low = threshold is not None and figure in GATED and r is not None and r < threshold
                        cells.append("-" if r is None else f"[red]{r:.2f}×[/red]" if low else f"{r:.2f}×")
                out.add_row(*cells, end_section=n == len(shown) - 1)
    return out


def unshared(folders: list[Folder], items: list[str]) -> list[str]:
    """'only in A, C: unfreeze-all (B: oom)': the items not every folder finished, grouped by where they are."""
    where: dict[tuple, list[str]] = {}
    for item in dict.fromkeys(i for f in folders for i in [*f.values, *f.unfinished]):
        if item in items:
            continue
        status = ", ".join(f"{f.label}: {f.unfinished[item]}" for f in folders if item in f.unfinished)
        having = tuple(f.label for f in folders if item in f.values)
        where.setdefault(having, []).append(f"{item} ({status})" if status else item)
    return [f"{'only in ' + ', '.join(k) if k else 'finished in none'}: {', '.join(v)}" for k, v in where.items()]


def csv_text(folders: list[Folder], items: list[str]) -> str:
    """One row per (item, figure, folder) that has a value somewhere: the value and its ratio to the first's."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["item", "figure", "folder", "value", "ratio_to_first"])
    for item in items:
        for figure in FIGURES:
            first = folders[0].values[item].get(figure)
            if all(figure not in f.values[item] for f in folders):
                continue
            for folder in folders:
                value = folder.values[item].get(figure)
                r = ratio(first, value)
                writer.writerow([item, figure, str(folder.path), "" if value is None else value,
                                 "" if r is None else r])
    return buffer.getvalue()


def below(folders: list[Folder], items: list[str], threshold: float) -> list[str]:
    """Each gated figure of a later folder under `threshold` times the first folder's, and each variant
    the first folder finished that a later one did not (an out-of-memory is a regression too)."""
    first, found = folders[0], []
    for folder in folders[1:]:
        found += [f"{folder.label} {item}: {status}, where {first.label} finished it"
                  for item, status in folder.unfinished.items() if item in first.values]
        for item in items:
            for figure in GATED:
                r = ratio(first.values[item].get(figure), folder.values[item].get(figure))
                if r is not None and r < threshold:
                    found.append(f"{folder.label} {item} {SHOWN[figure][0]}: {r:.2f}× {first.label}'s "
                                 f"(--fail-below {threshold:g})")
    return found


def get_args_parser() -> Parser:
    p = Parser(prog="python -m bench.compare",
               description="Two or more run folders (or GPU-suite folders) side by side: every figure of the "
                           "variants they share, with its ratio to the first folder's.")
    p.add_argument("folders", nargs="+", type=Path, metavar="FOLDER",
                   help="a bench.run --out folder (results.json) or a bench.suite folder (suite.json); the first "
                        "is the reference")
    p.add_argument("--csv", type=Path, metavar="PATH",
                   help="also write one row per (item, figure, folder): value and ratio_to_first")
    p.add_argument("--force", action="store_true",
                   help="compare runs whose model, image size, batch size or precision differ (a warning)")
    p.add_argument("--fail-below", type=positive_float, metavar="RATIO",
                   help="exit 1 when a later folder's training or evaluation images/s is below RATIO times the "
                        "first's, or a variant the first finished did not finish there")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as e:  # argparse's one-line error (or --help): an exit code, not an exception, for callers
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: wide enough for four folders
    try:
        if len(args.folders) < 2:
            raise ConfigError("give two or more folders to compare")
        folders = [load(chr(ord("A") + i) if i < 26 else str(i + 1), p) for i, p in enumerate(args.folders)]
        if len({f.suite for f in folders}) > 1:
            kinds = ", ".join(f"{f.path} is a {'suite' if f.suite else 'run'} folder" for f in folders)
            raise ConfigError(f"compare run folders with run folders and suite folders with suite folders ({kinds})")
        found = differences(folders)
        if found and not args.force:
            raise ConfigError(f"{'; '.join(found)}; --force compares them anyway")
        items = [i for i in folders[0].values if all(i in f.values for f in folders)]
        if not items:
            raise ConfigError("no variant finished in every folder: "
                              + "; ".join(f"{f.path}: {', '.join(f.values) or 'none'}" for f in folders))
        if args.csv:  # before anything is printed: an unwritable path is bad input like any other
            try:
                atomic_write(args.csv, csv_text(folders, items))
            except OSError as e:
                raise ConfigError(f"--csv {args.csv}: not writable ({e.strerror or e})") from None
    except ConfigError as e:
        print(f"bench.compare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if found:
        print(f"bench.compare: warning: {'; '.join(found)} (compared anyway: --force)", file=sys.stderr)
    console.print(table(folders, items, args.fail_below))
    for line in unshared(folders, items):
        console.print(escape(line), highlight=False)
    offenders = below(folders, items, args.fail_below) if args.fail_below else []
    for line in offenders:
        console.print(f"[red]regression[/red]: {escape(line)}", highlight=False)
    return EXIT_FAILED if offenders else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
