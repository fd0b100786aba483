"""Command-line flags and presets, parsed into `bench.settings.Settings`. Flags are declared once,
grouped, with defaults in their help.

Precedence: built-in defaults < the profile's values (`profiles/NAME.toml`) < flags on the command line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources

import torch

from bench.args import Parser, batch_size_arg, count_or_fraction, int_in, non_negative_float, positive_int, seed_list
from bench.distributed import LR_SCALES, PARALLEL
from bench.errors import ConfigError
from bench.settings import GROUP_OF, STUDY, Settings
from bench.train import OPTIMIZERS, PRECISIONS, SCHEDULERS
from models import HEADS, UNITS
from pipelines import AUGMENTS, DATASETS, EVAL_SPLITS, LOADERS, NORMALIZE, default_loader, folder_path, num_classes
from pipelines.folder import PREFIX

DEFAULT_PROFILE = "default"


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
    g.add_argument("--seeds", default=None, type=seed_list,
                   help="repeats: train every variant once per seed (data order, head initialisation, augmentation), "
                        "e.g. 0,1,2; --seed still draws the validation split")
    g.add_argument("--repeats", type=int_in(2, 100), default=None, help="repeats: --seeds 0,1,...,N-1")
    g.add_argument("--vary-split", default=False, action=argparse.BooleanOptionalAction,
                   help="with repeats: each seed also draws its own validation split (and synthetic data)")
    g.add_argument("--tolerance", type=non_negative_float, default=1.0,
                   help="the pick under the table: the cheapest variant whose top-1 is within this many points of "
                        "the best (with repeats: not shown to be worse by more)")
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
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (torchvision's DEFAULT weights), pretext (pretrained offline on a synthetic source "
                        "task, built once and cached in --data-dir), none, or a state-dict path")
    g.add_argument("--head", default="linear", choices=sorted(HEADS), help="classifier head")
    g.add_argument("--unit", default="module", choices=UNITS, help="what one layer of --unfreeze counts")
    g.add_argument("--unfreeze", default="1,3,6,12,15,25", help="depths to sweep: last N layers trainable, 'all' = every layer")
    g.add_argument("--approaches", default=None,
                   help="sweep named approaches instead of depths: shallow (head), deep (layer4 + head), scratch (all, no weights)")
    g.add_argument("--epoch-budgets", default=None, help="sweep epoch budgets instead of depths, e.g. 20,50,100")
    g.add_argument("--frozen-bn", default="eval", choices=("eval", "train"),
                   help="mode of frozen BatchNorm layers while training (train reproduces seed 000's drifting statistics)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", type=dataset_arg, metavar="{" + ",".join(sorted(DATASETS)) + ",folder:PATH}",
                   help="dataset; folder:PATH reads PATH/train/<class>/* with PATH/val/<class>/* (and optionally "
                        "test/), or one PATH/<class>/* tree split by --val-size (default 0.1 for folders)")
    g.add_argument("--data-dir", default=None, help="dataset directory (default: ~/.cache/finetune-bench)")
    g.add_argument("--val-size", type=count_or_fraction, default=10000,
                   help="validation images held out of the training set: a count (a multiple of the classes) or a "
                        "fraction of every class")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="folders: skip and count unreadable or truncated images instead of stopping at the first")
    g.add_argument("--train-size", type=int_in(1, 200_000), default=50000, help="synthetic: training images")
    g.add_argument("--num-classes", type=int_in(2, 1000), default=100, help="synthetic: number of classes")
    g.add_argument("--image-size", type=int_in(8, 1024), default=224, help="side of the images the model sees (CIFAR's 32 px are resized to it; folders' images are cropped to it)")
    g.add_argument("--augment", default="flip-crop", choices=AUGMENTS,
                   help="training augmentation (flip-crop: pad-4 crop + flip, on folders the random-resized crop + flip; "
                        "heavy: seed 003's, with colour and rotation)")
    g.add_argument("--normalize", default="cifar", choices=sorted(NORMALIZE),
                   help="mean/std used to normalise (default imagenet for folders)")
    g.add_argument("--loader", default="auto", choices=("auto", *LOADERS),
                   help="input pipeline: dali, torch (tensor ops on the device), torchvision (the seeds' CPU DataLoader); "
                        "auto = dali where it is installed, else torch")
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
    g.add_argument("--breakdown", default=False, action=argparse.BooleanOptionalAction,
                   help="after training, time a separate window of steps phase by phase (input wait, frozen forward, "
                        "trainable forward, backward, optimizer), synchronising at every edge; kept out of images/s")
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


def default_data_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "finetune-bench")


def dataset_arg(text: str) -> str:
    """A dataset name, or folder:PATH with PATH made absolute (a resumed run or a checkpoint finds the
    folder from any working directory)."""
    root = folder_path(text)
    if root is not None:
        return f"{PREFIX}{os.path.abspath(root.expanduser())}"
    if text not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose from: {', '.join(sorted(DATASETS))}, "
                                         f"folder:PATH")
    return text


# What a folder dataset changes when the flag is not given: CIFAR's 10,000 held-out images and CIFAR's
# statistics (the profiles' values) do not fit someone's own photographs.
FOLDER_DEFAULTS = {"val_size": 0.1, "normalize": "imagenet"}


COMMANDS = ("list_profiles", "list_layers", "dry_run")  # flags that answer a question instead of running
ALIASES = ("repeats",)  # flags that only spell another setting (--repeats N is --seeds 0..N-1)



@dataclass(frozen=True)
class Invocation:
    """One command line: its settings, what it asks for, and which flags it gave explicitly (a
    variant that overrides one of those would silently ignore it)."""
    settings: Settings
    command: str            # "run" or one of COMMANDS
    given: frozenset[str]
    profile_description: str


def parse_config(argv: list[str] | None = None) -> Invocation:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    profile = load_profile(known.profile) if not known.list_profiles else {}
    description = profile.pop("description", "")
    variant_specs = profile.pop("variants", None)  # [[variants]] tables: not a flag
    unknown = sorted(set(profile) - GROUP_OF.keys())
    if unknown:
        raise ConfigError(f"profile {known.profile!r} sets unknown settings: {', '.join(unknown)}")
    parser.set_defaults(**profile)
    args = vars(parser.parse_args(argv))
    command = next((c for c in COMMANDS if args[c]), "run")
    given = frozenset(a.dest for a in parser._actions
                      if any(arg == o or arg.startswith(o + "=") for o in a.option_strings for arg in argv))
    args["variant_specs"] = None if args["approaches"] or args["epoch_budgets"] else variant_specs
    args["data_dir"] = args["data_dir"] or default_data_dir()
    if args["repeats"] is not None:
        if args["seeds"] is not None:
            raise ConfigError("--seeds and --repeats say the same thing; give one")
        args["seeds"] = list(range(args["repeats"]))
    if folder_path(args["dataset"]) is not None:
        args.update({k: v for k, v in FOLDER_DEFAULTS.items() if k not in given})
    if args["loader"] == "auto":  # resolved once: the run records, resumes and reports the loader it used
        args["loader"] = default_loader()
    settings = Settings.from_flat(args)
    check_compile(settings, given)
    if settings.sweep.smoke:
        settings = shrink(settings)
    check(settings)
    return Invocation(settings, command, given, description)


def saved_settings(values: dict, **changes) -> Settings:
    """Settings stored by a run (results.json's `run`, a checkpoint's `settings`) over today's defaults,
    for the names an older run did not store (schema 2 had no --compile-backend)."""
    parser = get_args_parser()
    defaults = {name: parser.get_default(name) for name in GROUP_OF}
    defaults["data_dir"] = defaults["data_dir"] or default_data_dir()
    defaults["loader"] = default_loader()  # a run too old to store its loader
    return Settings.from_flat({**defaults, **{k: v for k, v in values.items() if k in GROUP_OF}, **changes})


def resumed(invocation: Invocation, saved_run: dict) -> Invocation:
    """--resume OUT: the saved run's settings. A setting given on the command line beside --resume
    must agree with the saved one (or the run is refused, naming each difference); what only decides
    where files go and what this process records (tracing, checkpoints, the data directory) may be
    given anew."""
    now, saved = invocation.settings, saved_settings(saved_run)
    now_flat, saved_flat = now.flat(), saved.flat()
    found_auto = now.train.batch_size == "auto" and saved_run.get("batch_size_search")  # found once, kept
    differ = [f"{k}: saved {saved_flat[k]!r}, now {now_flat[k]!r}" for k in sorted(invocation.given & STUDY)
              if now_flat[k] != saved_flat[k] and not (k == "batch_size" and found_auto)]
    if "profile" in invocation.given and now.output.profile != saved.output.profile:
        differ.insert(0, f"profile: saved {saved.output.profile!r}, now {now.output.profile!r}")
    if differ:
        raise ConfigError(f"--resume {now.output.resume}: settings differ from the saved run ({'; '.join(differ)})")
    given = {k: now_flat[k] for k in GROUP_OF.keys() - STUDY if k in invocation.given}
    settings = saved.replace(**{**{k: now_flat[k] for k in GROUP_OF.keys() - STUDY}, "profile": saved.output.profile,
                                "data_dir": saved.output.data_dir, **given})
    return Invocation(settings, invocation.command, invocation.given, saved_run.get("profile_description", ""))


def check_compile(s: Settings, given: frozenset[str]) -> None:
    """Checked before --smoke, which turns compiling off."""
    speed = s.speed
    if s.data.final and "eval_split" in given and s.data.eval_split == "val":
        raise ConfigError("--final scores the test split; drop --eval-split val")
    if "compile_backend" in given and not speed.compile:
        raise ConfigError(f"--compile-backend {speed.compile_backend} needs --compile")
    if speed.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown --compile-backend {speed.compile_backend!r}; choose from: "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if speed.compile_mode and speed.compile_backend != "inductor":
        raise ConfigError(f"--compile-mode {speed.compile_mode} is inductor's; drop it or use --compile-backend inductor")


def check(s: Settings) -> None:
    """Flags that contradict each other: say which, rather than silently ignore one."""
    train, speed = s.train, s.speed
    if speed.compile_mode and not speed.compile:
        raise ConfigError(f"--compile-mode {speed.compile_mode} needs --compile")
    if train.oom_scale_lr and train.oom != "retry":
        raise ConfigError("--oom-scale-lr needs --oom retry")
    if speed.feature_cache and s.data.augment != "none":
        raise ConfigError(f"--feature-cache needs --augment none (--augment {s.data.augment} changes the frozen "
                          "layers' input every epoch); add --no-feature-cache")
    if speed.feature_cache and not s.splits_trunk:
        raise ConfigError("--feature-cache needs the frozen prefix split off (--split-trunk and --frozen-bn eval); "
                          "add --no-feature-cache")
    if s.data.vary_split and not s.sweep.seeds:
        raise ConfigError("--vary-split needs repeats (--seeds or --repeats)")
    if train.steps and train.max_steps:
        raise ConfigError("--steps (throughput mode) and --max-steps contradict each other; give one")
    evaluated = [f for f, on in (("--final-best", s.sweep.final_best), ("--early-stop", train.early_stop),
                                 ("--train-acc", train.train_acc)) if on]
    if train.steps and evaluated:
        off = {"--final-best": "--no-final-best", "--early-stop": "--early-stop 0", "--train-acc": "--no-train-acc"}
        raise ConfigError(f"--steps is throughput mode and evaluates nothing, so {evaluated[0]} cannot be honoured; "
                          f"add {off[evaluated[0]]}, or use --max-steps to cap an evaluated run")


def shrink(s: Settings) -> Settings:
    """--smoke: the same study in miniature, so every preset runs end to end on a CPU in tests."""
    batch = s.train.batch_size
    smoke = {"weights": "none", "image_size": 32}
    # variants may set their own sizes or weights: the miniature overrides those too
    specs = ([{**spec, **{k: v for k, v in smoke.items() if k in spec}} for spec in s.sweep.variant_specs]
             if s.sweep.variant_specs else None)
    # an image folder stays what it is: its size is the user's, and replacing it would test another dataset
    data = {}
    if folder_path(s.data.dataset) is None:
        classes = num_classes(s.data.dataset, s.data.num_classes)
        data = dict(dataset="synthetic", num_classes=classes, train_size=max(256, 2 * classes),
                    val_size=max(128, classes))
    return s.replace(**data, max_steps=s.train.max_steps or 4,
                     batch_size=batch if batch == "auto" else min(batch, 32), eval_batch_size=None, workers=1,
                     compile=False, compile_mode=None, warmup_steps=1, variant_specs=specs, **smoke)
