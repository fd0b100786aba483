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
import sys
from pathlib import Path

from rich.console import Console

from bench.checkpoint import build_from_checkpoint, load_checkpoint
from bench.args import Parser, int_in
from bench.config import saved_settings
from bench.errors import USER_ERRORS, CheckpointError
from bench.files import ensure_writable
from bench.inputs import load_splits, resolve_device
from bench.scoring import default_out_dir, evaluate_model, print_report
from bench.settings import Settings
from pipelines import DATASETS, EVAL_SPLITS, LOADERS, overlap


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
# the command
# ----------------------------------------------------------------------------------------------------

def run_settings(ckpt: dict, args: argparse.Namespace) -> Settings:
    """The run's settings from the checkpoint (today's defaults for anything an older checkpoint
    leaves out), then this command's overrides."""
    changes = {k: v for k, v in (("data_dir", args.data_dir), ("dataset", args.dataset), ("loader", args.loader),
                                 ("eval_batch_size", args.batch_size)) if v}
    if args.split:  # select_splits: final scores the test split; otherwise eval_split does
        changes.update(final=args.split == "test", eval_split=args.split)
    return saved_settings(ckpt["settings"], **changes)


def main(argv: list[str] | None = None) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=140)
    try:
        args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        path = Path(args.checkpoint)
        ckpt = load_checkpoint(path)
        s = run_settings(ckpt, args)
        dataset, stored_dataset = s.data.dataset, ckpt["settings"].get("dataset")
        variant = ckpt["row"].get("variant") or path.stem
        split_name = s.data.scored_split
        out = Path(args.out) if args.out else default_out_dir(
            path, variant, split_name, dataset if dataset != stored_dataset else None)
        device = resolve_device(args.device)
        data, train, evaluation = load_splits(s)
        classes = list(ckpt["classes"])
        if data.num_classes != len(classes):
            raise CheckpointError(f"checkpoint's {s.model.model} classifies {len(classes)} classes; "
                                  f"{dataset} has {data.num_classes}")
        model = build_from_checkpoint(ckpt, data.num_classes)
        ensure_writable(out, "--out")  # last: bad input leaves nothing behind
    except USER_ERRORS as e:
        print(f"bench.evaluate: error: {e}", file=sys.stderr)
        return 2
    if data.classes != classes:
        console.print(f"[yellow]note[/yellow]: {dataset}'s class names differ from the checkpoint's; "
                      f"reporting the checkpoint's")
    leaked = overlap(train, evaluation)
    if leaked:
        console.print(f"[red]leakage[/red]: {leaked} of {len(evaluation)} evaluation images also appear in the "
                      f"training split the run used; this accuracy overstates the model")
    console.print(f"evaluating {path} ({s.model.model}, {variant}) on {dataset} {split_name} "
                  f"({len(evaluation):,} images) with --loader {s.data.loader}, {s.speed.precision}, "
                  f"{s.data.image_size}px on {device.type}")
    result = evaluate_model(model, s, evaluation, classes, out, device, seed=args.seed, variant=variant,
                            checkpoint=str(path), info={"eval_overlap": leaked, "run_row": ckpt["row"]})
    print_report(console, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
