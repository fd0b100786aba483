"""Command-line flags and presets. Flags are declared once, grouped, with defaults in their help;
`get_args_parser()` builds the parser so tests and other tools reuse it.

Precedence: built-in defaults < the profile's values (`profiles/NAME.toml`) < flags on the command line.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import resources

import torch

from bench.distributed import LR_SCALES, PARALLEL
from bench.train import OPTIMIZERS, PRECISIONS, SCHEDULERS
from bench.variants import ConfigError
from models import HEADS, UNITS
from pipelines import AUGMENTS, DATASETS, EVAL_SPLITS, LOADERS, NORMALIZE, num_classes

DEFAULT_PROFILE = "default"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr and exit 2 (argparse's default also prints the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_in(low: int, high: int):
    """An argparse type for integers in [low, high]: sizes past `high` would exhaust memory before
    they could fail more usefully (a 10-million-image synthetic set is 30 GB)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high:,}, got {value:,}")
        return value
    return parse


def batch_size_arg(text: str) -> int | str:
    """A batch size, or `auto` (bench.batch_size finds the fastest that fits)."""
    return "auto" if text == "auto" else int_in(1, 65536)(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.run", description="Layer-wise fine-tuning benchmark: for each freezing "
               "depth a fresh model is trained, evaluated and measured.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--profile", default=DEFAULT_PROFILE, help="preset from profiles/ (see --list-profiles)")
    g.add_argument("--list-profiles", action="store_true", help="list the presets and exit")
    g.add_argument("--list-layers", action="store_true", help="print the model's layers numbered from the output end and exit")
    g.add_argument("--dry-run", action="store_true", help="print the plan (variants, trainable layers) and exit")
    g.add_argument("--smoke", action="store_true",
                   help="shrink any profile to a CPU-sized check: synthetic data with the same classes, 32 px, "
                        "no pretrained weights, 4 steps per variant")
    g.add_argument("--final-best", default=False, action=argparse.BooleanOptionalAction,
                   help="after the sweep, retrain the best variant on validation on train + val and score the test split")
    g.add_argument("--out", default=None, help="output directory (default: runs/<UTC time>-<profile>)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed for initialisation, shuffling, augmentation and splits")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="finish the run in OUT: rerun only its unfinished variants, with the same settings")
    g.add_argument("--oom", default="fail", choices=("fail", "retry"),
                   help="on out-of-memory: record the variant as oom, or halve the batch until it fits")
    g.add_argument("--oom-scale-lr", default=False, action=argparse.BooleanOptionalAction,
                   help="with --oom retry: scale the learning rate with the batch")
    g.add_argument("--save-checkpoint", default=False, action=argparse.BooleanOptionalAction,
                   help="keep every variant's trained weights in OUT/checkpoints/ (the best one is always kept)")
    g.add_argument("--evaluate-best", default=True, action=argparse.BooleanOptionalAction,
                   help="after the sweep, write the best variant's confusion matrix, classification report and "
                        "prediction grid to OUT/evaluation/ (as python -m bench.evaluate does)")

    g = p.add_argument_group("profiling")
    g.add_argument("--trace", default=None, action=argparse.BooleanOptionalAction,
                   help="record a torch.profiler trace per variant for TensorBoard (default: on for CUDA runs)")
    g.add_argument("--trace-steps", type=int_in(1, 100), default=3,
                   help="training steps recorded per variant, after the --warmup-steps and one profiler warm-up step")
    g.add_argument("--trace-dir", default=None, help="where the traces go (default: OUT/traces)")

    g = p.add_argument_group("model and freezing")
    g.add_argument("--model", default="resnet50", help="any torchvision ResNet (resnet18 .. resnet152, resnext*, wide_resnet*)")
    g.add_argument("--weights", default="imagenet", help="imagenet (torchvision's DEFAULT weights), none, or a state-dict path")
    g.add_argument("--head", default="linear", choices=sorted(HEADS), help="classifier head")
    g.add_argument("--unit", default="module", choices=UNITS, help="what one layer of --unfreeze counts")
    g.add_argument("--unfreeze", default="1,3,6,12,15,25", help="depths to sweep: last N layers trainable, 'all' = every layer")
    g.add_argument("--approaches", default=None,
                   help="sweep named approaches instead of depths: shallow (head), deep (layer4 + head), scratch (all, no weights)")
    g.add_argument("--epoch-budgets", default=None, help="sweep epoch budgets instead of depths, e.g. 20,50,100")
    g.add_argument("--frozen-bn", default="eval", choices=("eval", "train"),
                   help="mode of frozen BatchNorm layers while training (train reproduces seed 000's drifting statistics)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=sorted(DATASETS), help="dataset")
    g.add_argument("--data-dir", default=None, help="dataset directory (default: ~/.cache/finetune-bench)")
    g.add_argument("--val-size", type=int_in(1, 200_000), default=10000, help="validation images held out of the training set")
    g.add_argument("--train-size", type=int_in(1, 200_000), default=50000, help="synthetic: training images")
    g.add_argument("--num-classes", type=int_in(2, 1000), default=100, help="synthetic: number of classes")
    g.add_argument("--image-size", type=int_in(8, 1024), default=224, help="side the 32 px images are resized to")
    g.add_argument("--augment", default="flip-crop", choices=AUGMENTS,
                   help="training augmentation (flip-crop: pad-4 crop + flip; heavy: seed 003's, with colour and rotation)")
    g.add_argument("--normalize", default="cifar", choices=sorted(NORMALIZE), help="mean/std used to normalise")
    g.add_argument("--loader", default="dali", choices=LOADERS,
                   help="input pipeline: dali, torch (tensor ops on the device), torchvision (the seeds' CPU DataLoader)")
    g.add_argument("--eval-split", default="val", choices=EVAL_SPLITS, help="split scored after every epoch")
    g.add_argument("--final", action="store_true", help="train on train + val and score the test split")
    g.add_argument("--allow-overlap", action="store_true",
                   help="report accuracy even when evaluation images also appear in the training split")
    g.add_argument("--workers", type=int_in(0, 64), default=4, help="loader CPU threads (DALI) or worker processes (torchvision)")

    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = cuda when available")
    g.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS), help="autocast dtype (fp16 adds loss scaling)")
    g.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC model and inputs")
    g.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction, help="torch.compile the model")
    g.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode (inductor's)")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend: inductor, or any registered dynamo backend (eager and aot_eager "
                        "compile in seconds, to check that every variant is captured)")
    g.add_argument("--split-trunk", default=True, action=argparse.BooleanOptionalAction,
                   help="run the frozen prefix apart, under no_grad in eval mode (needs --frozen-bn eval)")
    g.add_argument("--feature-cache", default=False, action=argparse.BooleanOptionalAction,
                   help="with --augment none: run the frozen prefix once per image and train the rest from "
                        "its cached outputs (on the device, else in host memory)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=15, help="epochs per variant")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="throughput mode: train each variant for --warmup-steps + this many timed steps, no evaluation")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="train each variant at most this many steps (evaluated as usual; --smoke uses it)")
    g.add_argument("--batch-size", type=batch_size_arg, default=1024,
                   help="training batch size (per rank under torchrun), or auto: the fastest power of two that "
                        "fits, found once per run on the variant with the most trainable parameters")
    g.add_argument("--eval-batch-size", type=int_in(1, 65536), default=None, help="evaluation batch size (default: --batch-size)")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=non_negative_float, default=1e-3, help="learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay")
    g.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    g.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, help="learning-rate schedule, stepped every step")
    g.add_argument("--step-size", type=positive_int, default=10, help="step scheduler: epochs between decays")
    g.add_argument("--gamma", type=non_negative_float, default=0.1, help="step scheduler: decay factor")
    g.add_argument("--plateau-patience", type=int_in(0, 1000), default=2,
                   help="plateau scheduler: epochs without a lower validation loss before the lr is cut by --gamma")
    g.add_argument("--early-stop", type=int_in(0, 1000), default=0, metavar="PATIENCE",
                   help="stop a variant after this many epochs without improvement on the validation metric (0: off)")
    g.add_argument("--early-stop-metric", default="val_loss", choices=("val_loss", "top1"), help="what early stopping watches")
    g.add_argument("--train-acc", default=False, action=argparse.BooleanOptionalAction,
                   help="also score the training split after every epoch (seed 000's extra pass; costs one "
                        "evaluation pass over the training set per epoch, reported as train_acc_s)")
    g.add_argument("--label-smoothing", type=non_negative_float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--warmup-steps", type=int_in(0, 100_000), default=5, help="first steps left out of the throughput figures")

    g = p.add_argument_group("distributed (under torchrun; no effect on one process)")
    g.add_argument("--parallel", default="data", choices=PARALLEL,
                   help="data: every rank trains the same variant with DDP on its shard of each epoch (global batch = "
                        "--batch-size x world size); variants: each rank trains whole variants on its own device")
    g.add_argument("--lr-scale-world", default="none", choices=LR_SCALES,
                   help="with --parallel data: multiply --lr by the world size (linear) or its square root (sqrt), "
                        "for the global batch")
    g.add_argument("--dist-timeout", type=int_in(10, 86_400), default=1800,
                   help="seconds a collective waits for a stuck rank before the run fails (a rank that exits "
                        "stops the run at once)")
    return p


def profile_names() -> list[str]:
    return sorted(f.name[:-5] for f in resources.files("profiles").iterdir() if f.name.endswith(".toml"))


def load_profile(name: str) -> dict:
    if name not in profile_names():
        raise ConfigError(f"unknown profile {name!r}; choose from: {', '.join(profile_names())}")
    text = resources.files("profiles").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags over the chosen profile; `cfg.profile_description` carries the profile's text."""
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    profile = load_profile(known.profile) if not known.list_profiles else {}
    description = profile.pop("description", "")
    variant_specs = profile.pop("variants", None)  # [[variants]] tables: not a flag
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(profile) - dests)
    if unknown:
        raise ConfigError(f"profile {known.profile!r} sets unknown settings: {', '.join(unknown)}")
    parser.set_defaults(**profile)
    cfg = parser.parse_args(argv)
    cfg.profile_description = description
    cfg.variant_specs = None if cfg.approaches or cfg.epoch_budgets else variant_specs
    # Which settings the command line gave explicitly: a variant that overrides one would ignore it.
    cfg.given = sorted(a.dest for a in parser._actions
                       if any(arg == o or arg.startswith(o + "=") for o in a.option_strings for arg in argv))
    if cfg.final and "eval_split" in cfg.given and cfg.eval_split == "val":
        raise ConfigError("--final scores the test split; drop --eval-split val")
    if "compile_backend" in cfg.given and not cfg.compile:
        raise ConfigError(f"--compile-backend {cfg.compile_backend} needs --compile")
    if cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown --compile-backend {cfg.compile_backend!r}; choose from: "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if cfg.compile_mode and cfg.compile_backend != "inductor":
        raise ConfigError(f"--compile-mode {cfg.compile_mode} is inductor's; drop it or use --compile-backend inductor")
    if cfg.smoke:
        shrink(cfg)
    # Flags that contradict each other: say which, rather than silently ignore one.
    if cfg.compile_mode and not cfg.compile:
        raise ConfigError(f"--compile-mode {cfg.compile_mode} needs --compile")
    if cfg.oom_scale_lr and cfg.oom != "retry":
        raise ConfigError("--oom-scale-lr needs --oom retry")
    if cfg.feature_cache and cfg.augment != "none":
        raise ConfigError(f"--feature-cache needs --augment none (--augment {cfg.augment} changes the frozen "
                          "layers' input every epoch); add --no-feature-cache")
    if cfg.feature_cache and (cfg.frozen_bn != "eval" or not cfg.split_trunk):
        raise ConfigError("--feature-cache needs the frozen prefix split off (--split-trunk and --frozen-bn eval); "
                          "add --no-feature-cache")
    if cfg.steps and cfg.max_steps:
        raise ConfigError("--steps (throughput mode) and --max-steps contradict each other; give one")
    evaluated = [f for f, on in (("--final-best", cfg.final_best), ("--early-stop", cfg.early_stop),
                                 ("--train-acc", cfg.train_acc)) if on]
    if cfg.steps and evaluated:
        off = {"--final-best": "--no-final-best", "--early-stop": "--early-stop 0", "--train-acc": "--no-train-acc"}
        raise ConfigError(f"--steps is throughput mode and evaluates nothing, so {evaluated[0]} cannot be honoured; "
                          f"add {off[evaluated[0]]}, or use --max-steps to cap an evaluated run")
    return cfg


def setting_names() -> set[str]:
    """Every flag's destination: what a profile or a variant may set."""
    return {a.dest for a in get_args_parser()._actions} - {"help"}


def shrink(cfg: argparse.Namespace) -> None:
    """--smoke: the same study in miniature, so every preset runs end to end on a CPU in tests."""
    classes = num_classes(cfg.dataset, cfg.num_classes)
    cfg.dataset, cfg.num_classes, cfg.weights = "synthetic", classes, "none"
    cfg.train_size, cfg.val_size, cfg.image_size = max(256, 2 * classes), max(128, classes), 32
    cfg.max_steps, cfg.batch_size, cfg.eval_batch_size = cfg.max_steps or 4, \
        cfg.batch_size if cfg.batch_size == "auto" else min(cfg.batch_size, 32), None
    cfg.workers, cfg.compile, cfg.compile_mode, cfg.warmup_steps = 1, False, None, 1
    # variants may set their own sizes or weights: the miniature overrides those too
    smoke = {"weights": "none", "image_size": 32}
    cfg.variant_specs = [{**spec, **{k: v for k, v in smoke.items() if k in spec}}
                         for spec in cfg.variant_specs] if cfg.variant_specs else None
