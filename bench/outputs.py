"""What a finished run leaves beyond results.json: checkpoints, trace summaries on the terminal,
plots, the best variant's class-by-class evaluation, report.md and table.txt.
"""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from bench.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from bench.config import saved_settings
from bench.files import atomic_write
from bench.plots import write_plots
from bench.report import markdown_report, render_text, trace_table
from bench.schema import Status
from bench.scoring import default_out_dir, evaluate_model, print_report
from bench.settings import Settings
from pipelines import Dataset, select_splits


class Checkpoints:
    """`checkpoints/best.pt` (the best row so far, by `best_key`) and, with --save-checkpoint, every
    variant's `checkpoints/<variant>.pt`."""

    def __init__(self, folder: Path, keep_all: bool, classes: list[str], saved_rows: list[dict]):
        self.folder, self.keep_all, self.classes = folder, keep_all, classes
        self.best_path = folder / "best.pt"
        # a resumed run's best.pt belongs to the best of its kept rows
        self.best = max((best_key(r) for r in saved_rows if r.get("status") == Status.OK), default=None)

    def on_trained(self, model, row: dict, variant_settings: Settings) -> None:
        settings = variant_settings.study()
        if self.keep_all:
            save_checkpoint(self.folder / f"{row['variant']}.pt", model, settings=settings, row=row,
                            classes=self.classes)
        if self.best is None or best_key(row) > self.best:
            self.best = best_key(row)
            save_checkpoint(self.best_path, model, settings=settings, row=row, classes=self.classes)


def best_key(row: dict) -> tuple:
    """Which row is best: a --final-best row beats every validation row, then the higher top-1."""
    return (row.get("kind") == "final", row.get("top1") or 0.0)


def write_artifacts(console: Console, score_best: bool, out: Path, run_info: dict, rows: list[dict],
                    aggregates: list[dict], table, data: Dataset, best_path: Path, device: torch.device) -> None:
    """Everything made from the finished results; a failure here is a warning: results.json is complete."""
    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as e:  # the results are written; say what is missing and go on
            console.print(f"[yellow]warning[/yellow]: {what} failed ({type(e).__name__}: {e})")
            return None

    for row in rows:
        traced = trace_table(row)
        if traced is not None:
            console.print(traced)
    plots = attempt("plots", lambda: write_plots(out, run_info, rows, aggregates)) or []
    evaluation = None
    if score_best and best_path.exists():
        evaluation = attempt("evaluating the best variant", lambda: evaluate_best(console, out, best_path, data, device))
    atomic_write(out / "table.txt", render_text(table))
    atomic_write(out / "report.md", markdown_report(run_info, rows, plots, evaluation, out, aggregates))
    console.print(f"report: {out / 'report.md'}" + (f"; traces: tensorboard --logdir {run_info['trace_dir']}"
                                                     if any(r.get("trace") for r in rows) else ""))


def evaluate_best(console: Console, out: Path, best_path: Path, data, device: torch.device) -> dict:
    """`python -m bench.evaluate OUT/checkpoints/best.pt`, in process: the same files, the same place."""
    checkpoint = load_checkpoint(best_path)
    s = saved_settings(checkpoint["settings"])
    _, split = select_splits(data, s.data.eval_split, s.data.final)
    variant = checkpoint["row"]["variant"]
    folder = default_out_dir(best_path, variant, s.data.scored_split)
    console.print(f"[bold]best variant[/bold]: {variant} (top-1 {checkpoint['row']['top1']:.2f} %), "
                  f"evaluated class by class")
    result = evaluate_model(build_from_checkpoint(checkpoint), s, split, data.classes, folder, device,
                            variant=variant, checkpoint=str(best_path))
    print_report(console, result)
    return {**result, "dir": str(folder)}
