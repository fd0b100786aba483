"""Scoring a trained model class by class: predictions, per-class report, confusion matrix and a grid
of predictions, for the best variant at the end of a run and for `python -m bench.evaluate`.
"""
from __future__ import annotations

import csv
import io
import json
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from torch import nn

from bench.files import atomic_write
from bench.inputs import make_loader
from bench.settings import Settings
from bench.train import Predictions, evaluate
from pipelines import FileSplit, Split

GRID = (3, 4)            # predictions.png: rows x columns of images
FEW_CLASSES = 20         # up to this many: class names on the axes, numbers in the cells, every class printed
WORST = 10               # with more classes the terminal shows this many worst classes by F1


def predict(model: nn.Module, s: Settings, split: Split | FileSplit, device: torch.device,
            num_classes: int) -> tuple[Predictions, float]:
    """Every image's prediction (in the split's order) and the mean loss, scored by the harness's own
    evaluation (`bench.train.evaluate`) with the run's loader, precision and memory format, so the
    accuracy matches the run's to the image."""
    was_training = model.training
    model = model.to(device, memory_format=torch.channels_last if s.speed.channels_last
                     else torch.contiguous_format).eval()
    stats = evaluate(model, make_loader(s, split, device, train=False), device=device, precision=s.speed.precision,
                     num_classes=num_classes, keep_predictions=True)
    model.train(was_training)
    p = stats.predictions
    # Every loader yields evaluation batches in the split's order, all of them; the picture grid relies
    # on it, so a loader that ever did not is a bug to stop on rather than a silently wrong figure.
    if p is None or not np.array_equal(p.labels, split.labels):
        raise RuntimeError(f"--loader {s.data.loader} yielded evaluation labels that are not the split's "
                           f"{len(split)} in order; per-image results would be misattributed")
    return p, stats.loss


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


# files

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


def plot_predictions(images, labels: np.ndarray, pred: np.ndarray, classes: list[str],
                     indices: np.ndarray, title: str) -> Figure:
    """Seed 004's picture: the original images (`images[i]`, H x W x 3 uint8, for i in `indices`; CIFAR's
    32 px enlarged without smoothing), each titled with the predicted class and whether it is right."""
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


def evaluate_model(model: nn.Module, s: Settings, split: Split | FileSplit, classes: list[str], out_dir,
                   device: torch.device, *, seed: int = 0, variant: str | None = None,
                   checkpoint: str | None = None, info: dict | None = None) -> dict:
    """Score `model` on `split` as the run does, write the four files into `out_dir`, return the
    contents of evaluation.json. `s`: the run's settings (loader, precision, image size...);
    `seed` picks the images of predictions.png; `info`: extra fields for evaluation.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes = len(classes)
    p, loss = predict(model, s, split, torch.device(device), n_classes)
    labels, pred, n = p.labels, p.pred, len(p.labels)
    cm = confusion_matrix(labels, pred, n_classes)
    per_class, macro, weighted = class_report(cm, classes)
    split_name = s.data.scored_split
    name = variant or "model"
    indices = np.random.default_rng(seed).choice(n, size=min(n, GRID[0] * GRID[1]), replace=False)
    result = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "variant": variant,
        "model": s.model.model,
        "dataset": s.data.dataset,
        "split": split_name,
        "images": n,
        "top1": round(100.0 * int(np.trace(cm)) / n, 3) if n else None,
        "top5": round(100.0 * int(p.hitk.sum()) / n, 3) if n else None,
        "top1_correct": int(np.trace(cm)),
        "top5_correct": int(p.hitk.sum()),
        "loss": round(loss, 5) if n else None,
        "num_classes": n_classes,
        "loader": s.data.loader,
        "precision": s.speed.precision,
        "image_size": s.data.image_size,
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
    what = f"{name}: {s.data.dataset} {split_name}, {n} images"
    # Figure objects, no pyplot: no global state, no GUI backend
    confusion = plot_confusion(cm, classes, f"{what}, top-1 {result['top1']:.2f} %")
    atomic_write(out_dir / "confusion_matrix.png", lambda f: confusion.savefig(f, format="png"))
    pictures = {int(i): split.picture(int(i)) for i in indices}  # a folder's files are decoded for the grid only
    grid = plot_predictions(pictures, labels, pred, classes, indices, f"{what} (seed {seed})")
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




def default_out_dir(checkpoint: Path, variant: str, split: str, dataset: str | None = None) -> Path:
    """`<run>/evaluation/<variant>-<split>` for `<run>/checkpoints/<variant>.pt`, else next to the file."""
    parent = checkpoint.resolve().parent
    base = parent.parent if parent.name == "checkpoints" else parent
    return base / "evaluation" / "-".join(part for part in (variant, dataset, split) if part)


