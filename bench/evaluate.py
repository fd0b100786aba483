"""`python -m bench.evaluate CHECKPOINT`: score a saved variant again, class by class, with pictures.

The checkpoint (`bench.checkpoint`) carries the run's settings, so the model and the evaluation split
are rebuilt exactly as the run built them: the same dataset, split seed and validation size, the same
loader, image size, normalisation, precision and channels_last. By default the split is the one the
run scored (`test` for a `--final` run, else its `--eval-split`); `--split`, `--dataset` and
`--data-dir` override that (`--split test` scores the test split, as `--final` does).

Files, in `--out` (default: `<run>/evaluation/<variant>-<split>/` when the checkpoint lies in a
`checkpoints/` directory of a run, `<run>/checkpoints/<variant>.pt`; otherwise
`<checkpoint's directory>/evaluation/<variant>-<split>/`; `-<dataset>` is added before the split when
`--dataset` changes the dataset). Existing files of an earlier evaluation there are replaced, each
atomically (temporary file + rename):

- `evaluation.json`: top-1, top-5, loss, image count, split, checkpoint path, variant, per-class
  precision / recall / F1 / support, their macro and weighted averages, and the confusion matrix;
- `classification_report.csv`: one row per class, then `macro avg` and `weighted avg` (as
  scikit-learn's report, computed here from the confusion matrix);
- `confusion_matrix.png`: row-normalised (each row is a true class; the diagonal is its recall);
- `predictions.png`: 12 evaluation images drawn with `--seed`, titled with the predicted class, green
  when right, red (with the true class) when wrong.

The terminal gets the report (every class up to 20 classes, else the averages and the 10 worst classes
by F1) and the top-1 / top-5 line. `evaluate_model` is the same code for a model in memory: the
harness calls it for the best variant at the end of a run.

Exit codes: 0 done; 2 bad input (one line on stderr: a missing, corrupt or foreign checkpoint, one that
does not fit its model or the dataset's classes, a missing dataset, an unwritable --out).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from torch import nn

from bench.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from bench.files import atomic_write, ensure_writable
from bench.config import ConfigError, Parser, int_in
from bench.sweep import make_loader
from bench.train import autocast
from models import ModelError
from pipelines import DATASETS, EVAL_SPLITS, LOADERS, DataError, Split, overlap

USER_ERRORS = (CheckpointError, ConfigError, DataError, ModelError)
GRID = (3, 4)            # predictions.png: rows x columns of images
FEW_CLASSES = 20         # up to this many: class names on the axes, numbers in the cells, every class printed
WORST = 10               # with more classes the terminal shows this many worst classes by F1


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.evaluate",
               description="Re-score a checkpoint on the run's evaluation split: per-class report, "
                           "confusion matrix and a grid of predictions.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by bench.run (bench.checkpoint format)")
    p.add_argument("--out", default=None,
                   help="output directory (default: <run>/evaluation/<variant>-<split>, see the module docstring)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the run's)")
    p.add_argument("--split", default=None, choices=EVAL_SPLITS,
                   help="split to score (default: the run's; test = the --final test split)")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="dataset (default: the run's)")
    p.add_argument("--loader", default=None, choices=LOADERS,
                   help="input pipeline (default: the run's; e.g. torch where DALI is not installed)")
    p.add_argument("--batch-size", type=int_in(1, 65536), default=None,
                   help="evaluation batch size (default: the run's evaluation batch size)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed choosing the images of predictions.png")
    return p


# ----------------------------------------------------------------------------------------------------
# predictions and metrics
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, cfg: argparse.Namespace, split: Split, device: torch.device) -> dict:
    """Top-1 predictions, top-5 hits, labels (numpy, in the split's order) and the summed loss, computed
    the way `bench.train.Trainer.evaluate` does: same loader, autocast dtype and memory format, so the
    accuracy matches the run's to the image."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    was_training = model.training
    model = model.to(device, memory_format=memory_format).eval()
    loader = make_loader(cfg, split, device, train=False)
    top1, hitk, labels = [], [], []
    loss = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in loader:
        with autocast(device, cfg.precision):
            logits = model(x)
        loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1.append(topk[:, 0])
        hitk.append((topk == y[:, None]).any(dim=1))
        labels.append(y)
    model.train(was_training)
    # One host copy at the end: a .cpu() per batch would stall the device queue every batch.
    out = {"pred": torch.cat(top1).cpu().numpy(), "hitk": torch.cat(hitk).cpu().numpy(),
           "labels": torch.cat(labels).cpu().numpy(), "loss": float(loss)}
    # Every loader yields evaluation batches in the split's order, all of them (checked in the tests for
    # torch, torchvision and DALI); the picture grid relies on it, so a loader that ever did not would
    # be a bug to stop on rather than a silently wrong figure.
    if not np.array_equal(out["labels"], split.labels):
        raise RuntimeError(f"--loader {cfg.loader} yielded {len(out['labels'])} evaluation labels that are not "
                           f"the split's {len(split)} in order; per-image results would be misattributed")
    return out


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(a.shape, dtype=np.float64), where=b > 0)


def class_report(cm: np.ndarray, classes: list[str]) -> tuple[list[dict], dict, dict]:
    """Per-class precision, recall, F1 and support, and their macro and weighted averages.

    As scikit-learn's `classification_report` with `labels=` every class and `zero_division=0`: a
    class never predicted has precision 0, one never present recall 0 (and weight 0 in the weighted
    average; the macro average counts every class of the model)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    precision, recall = _ratio(tp, cm.sum(axis=0).astype(np.float64)), _ratio(tp, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    rows = [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)]
    total = int(support.sum())
    weights = support / total if total else np.zeros_like(precision)
    macro = {"class": "macro avg", "precision": float(precision.mean()), "recall": float(recall.mean()),
             "f1": float(f1.mean()), "support": total}
    weighted = {"class": "weighted avg", "precision": float(precision @ weights), "recall": float(recall @ weights),
                "f1": float(f1 @ weights), "support": total}
    return rows, macro, weighted


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------

def _report_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for r in rows:
        writer.writerow([r["class"], f"{r['precision']:.6f}", f"{r['recall']:.6f}", f"{r['f1']:.6f}", r["support"]])
    return buf.getvalue().encode()


def plot_confusion(cm: np.ndarray, classes: list[str], title: str) -> Figure:
    """Row-normalised so that classes with different support compare; readable up to 100 classes (no
    cell numbers and index ticks beyond FEW_CLASSES)."""
    n = len(classes)
    share = _ratio(cm.astype(np.float64), cm.sum(axis=1, keepdims=True).astype(np.float64))
    fig = Figure(figsize=(10, 9), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="share of the true class's images")
    if n <= FEW_CLASSES:
        ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        for (i, j), value in np.ndenumerate(share):
            if cm[i, j]:
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.5 else "black")
        note = "; cells: % of the true class"
    else:  # names and numbers would be illegible: indices, every 10th; the CSV lists names in index order
        ticks = range(0, n, 10)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("predicted class index (every 10th shown; names in classification_report.csv, in index order)")
        ax.set_ylabel("true class index")
        note = ""
    ax.set_title(f"{title}\nrows normalised: each row is a true class, the diagonal its recall{note}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_predictions(images: np.ndarray, labels: np.ndarray, pred: np.ndarray, classes: list[str],
                     indices: np.ndarray, title: str) -> Figure:
    """Seed 004's picture: the original 32 px images, enlarged without smoothing, each titled with the
    predicted class and whether it is right."""
    rows, cols = GRID
    fig = Figure(figsize=(10, 9), dpi=100)
    axes = fig.subplots(rows, cols)
    for ax, i in zip_longest(axes.flat, indices):
        ax.set_axis_off()
        if i is None:
            continue
        ax.imshow(images[i], interpolation="nearest")
        right = bool(pred[i] == labels[i])
        text = f"{classes[pred[i]]}\n{right}" + ("" if right else f" (true: {classes[labels[i]]})")
        ax.set_title(text, color="green" if right else "red", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def evaluate_model(model: nn.Module, cfg: argparse.Namespace, split: Split, classes: list[str], out_dir,
                   device: torch.device, *, seed: int = 0, variant: str | None = None,
                   checkpoint: str | None = None, info: dict | None = None) -> dict:
    """Score `model` on `split` as the run does, write the four files into `out_dir`, return the
    contents of evaluation.json. `cfg`: the run's settings (loader, precision, image size...);
    `seed` picks the images of predictions.png; `info`: extra fields for evaluation.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes = len(classes)
    p = predict(model, cfg, split, torch.device(device))
    labels, pred, n = p["labels"], p["pred"], len(p["labels"])
    cm = confusion_matrix(labels, pred, n_classes)
    per_class, macro, weighted = class_report(cm, classes)
    split_name = "test" if cfg.final else cfg.eval_split
    name = variant or "model"
    indices = np.random.default_rng(seed).choice(n, size=min(n, GRID[0] * GRID[1]), replace=False)
    result = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "variant": variant,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "split": split_name,
        "images": n,
        "top1": round(100.0 * int(np.trace(cm)) / n, 3) if n else None,
        "top5": round(100.0 * int(p["hitk"].sum()) / n, 3) if n else None,
        "top1_correct": int(np.trace(cm)),
        "top5_correct": int(p["hitk"].sum()),
        "loss": round(p["loss"] / n, 5) if n else None,
        "num_classes": n_classes,
        "loader": cfg.loader,
        "precision": cfg.precision,
        "image_size": cfg.image_size,
        "device": str(device),
        "seed": seed,
        "grid_indices": [int(i) for i in indices],
        **(info or {}),
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "confusion_matrix": cm.tolist(),
        "files": {k: str(out_dir / f) for k, f in (("report", "classification_report.csv"),
                                                   ("confusion_matrix", "confusion_matrix.png"),
                                                   ("predictions", "predictions.png"))},
    }
    atomic_write(out_dir / "classification_report.csv", _report_csv([*per_class, macro, weighted]))
    what = f"{name}: {cfg.dataset} {split_name}, {n} images"
    # Figure objects, no pyplot: no global state, no GUI backend
    confusion = plot_confusion(cm, classes, f"{what}, top-1 {result['top1']:.2f} %")
    atomic_write(out_dir / "confusion_matrix.png", lambda f: confusion.savefig(f, format="png"))
    grid = plot_predictions(split.images, labels, pred, classes, indices, f"{what} (seed {seed})")
    atomic_write(out_dir / "predictions.png", lambda f: grid.savefig(f, format="png"))
    # Last: a directory with evaluation.json is a complete evaluation.
    atomic_write(out_dir / "evaluation.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def report_table(result: dict) -> Table:
    """Every class up to FEW_CLASSES; beyond, the averages and the WORST classes by F1."""
    per_class = result["per_class"]
    shown = per_class if len(per_class) <= FEW_CLASSES else \
        sorted(per_class, key=lambda r: (r["f1"], -r["support"]))[:WORST]
    title = f"{result['variant'] or 'model'}: {result['dataset']} {result['split']}, {result['images']} images"
    if len(shown) < len(per_class):
        title += f" ({WORST} worst of {len(per_class)} classes by F1)"
    table = Table(title=title)
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in [*shown, result["macro_avg"], result["weighted_avg"]]:
        style = "bold" if r["class"] in ("macro avg", "weighted avg") else None
        table.add_row(r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                      f"{r['support']:,}", style=style)
    return table


def print_report(console: Console, result: dict) -> None:
    console.print(report_table(result))
    files = result["files"]
    if len(result["per_class"]) > FEW_CLASSES:
        console.print(f"full report, every class: {files['report']}")
    console.print(f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  "
                  f"({result['top1_correct']:,} / {result['top5_correct']:,} of {result['images']:,} images)")
    console.print(f"files: {Path(files['report']).parent}/ (evaluation.json, classification_report.csv, "
                  f"confusion_matrix.png, predictions.png)")


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------

def run_settings(ckpt: dict, args: argparse.Namespace) -> argparse.Namespace:
    """The run's settings from the checkpoint over bench.run's defaults (for anything a checkpoint
    leaves out), then this command's overrides."""
    from bench.config import get_args_parser as run_parser
    cfg = run_parser().parse_args([])
    vars(cfg).update(ckpt["settings"])
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.dataset:
        cfg.dataset = args.dataset
    if args.split:  # select_splits: final scores the test split; otherwise eval_split does
        cfg.final, cfg.eval_split = args.split == "test", args.split
    if args.loader:
        cfg.loader = args.loader
    if args.batch_size:
        cfg.eval_batch_size = args.batch_size
    return cfg


def default_out_dir(checkpoint: Path, variant: str, split: str, dataset: str | None = None) -> Path:
    """`<run>/evaluation/<variant>-<split>` for `<run>/checkpoints/<variant>.pt`, else next to the file."""
    parent = checkpoint.resolve().parent
    base = parent.parent if parent.name == "checkpoints" else parent
    return base / "evaluation" / "-".join(part for part in (variant, dataset, split) if part)


def main(argv: list[str] | None = None) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=140)
    try:
        args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    # Imported here, not at the top: bench.run imports this module to evaluate the best variant.
    from bench.run import load_splits, resolve_device
    try:
        path = Path(args.checkpoint)
        ckpt = load_checkpoint(path)
        cfg = run_settings(ckpt, args)
        stored_dataset = ckpt["settings"].get("dataset")
        variant = ckpt["row"].get("variant") or path.stem
        split_name = "test" if cfg.final else cfg.eval_split
        out = Path(args.out) if args.out else default_out_dir(
            path, variant, split_name, cfg.dataset if cfg.dataset != stored_dataset else None)
        device = resolve_device(args.device)
        data, train, evaluation = load_splits(cfg)
        classes = list(ckpt["classes"])
        if data.num_classes != len(classes):
            raise CheckpointError(f"checkpoint's {cfg.model} classifies {len(classes)} classes; "
                                  f"{cfg.dataset} has {data.num_classes}")
        model = build_from_checkpoint(ckpt, data.num_classes)
        ensure_writable(out, "--out")  # last: bad input leaves nothing behind
    except USER_ERRORS as e:
        print(f"bench.evaluate: error: {e}", file=sys.stderr)
        return 2
    if data.classes != classes:
        console.print(f"[yellow]note[/yellow]: {cfg.dataset}'s class names differ from the checkpoint's; "
                      f"reporting the checkpoint's")
    leaked = overlap(train, evaluation)
    if leaked:
        console.print(f"[red]leakage[/red]: {leaked} of {len(evaluation)} evaluation images also appear in the "
                      f"training split the run used; this accuracy overstates the model")
    console.print(f"evaluating {path} ({cfg.model}, {variant}) on {cfg.dataset} {split_name} "
                  f"({len(evaluation):,} images) with --loader {cfg.loader}, {cfg.precision}, "
                  f"{cfg.image_size}px on {device.type}")
    result = evaluate_model(model, cfg, evaluation, classes, out, device, seed=args.seed, variant=variant,
                            checkpoint=str(path), info={"eval_overlap": leaked, "run_row": ckpt["row"]})
    print_report(console, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
