"""The steps, in priority order: the command each runs in its own process, how its figures are read
back, and when it cannot run here; and the two sizes they run at."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.suite.parse import (parse_environment, parse_loaders, parse_microbench, parse_pytest, parse_run,
                               parse_timm)

ROOT = Path(__file__).resolve().parents[2]  # the steps run here, so `-m bench.run` is this checkout's

# The GPU's: timm's defaults where they exist (batch 256, 10 warm-up steps), 50 timed steps (timm
# times 40); 16,384 training images cover the 60 steps in one epoch, so no epoch boundary (a loader
# restart) falls inside the timed steps. The rehearsal's: the same commands, as small as runs.
GPU = {"device": "cuda", "model": "resnet50", "image_size": 224, "num_classes": 100, "batch_size": 256,
       "train_size": 16384, "val_size": 256, "steps": 50, "warmup_steps": 10, "unfreeze": "1,3,6,12,15,25,all"}
REHEARSAL = {"device": "cpu", "model": "resnet18", "image_size": 32, "num_classes": 10, "batch_size": 8,
             "train_size": 32, "val_size": 16, "steps": 2, "warmup_steps": 1, "unfreeze": "1,3,6,12,15,25,all",
             "workers": 1}
LOADERS = "dali,torch,torchvision"


@dataclass
class Suite:
    """What the steps see: the settings, the output folder and what earlier steps recorded."""
    args: argparse.Namespace
    out: Path
    mode: str                      # "gpu" or "rehearsal"
    size: dict
    argv: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    records: dict = field(default_factory=dict)
    imports: dict = field(default_factory=dict)  # "module in folder" -> None when it imports, else why not

    def remaining_s(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    limit_s: int                   # on the GPU
    rehearse_limit_s: int          # in the CPU rehearsal
    command: Callable[[Suite, Path], list[str]]
    parse: Callable[[Path, Path, Path], dict]   # (suite folder, run folder, log) -> figures
    skip_if: Callable[[Suite], str | None] = lambda suite: None
    # a command run first, in the same folder and within the same limit (writing the step's input)
    before: Callable[[Suite, Path], list[str]] | None = None

    def limit(self, suite: Suite) -> int:
        return self.rehearse_limit_s if suite.mode == "rehearsal" else self.limit_s


def flags(settings: dict) -> list[str]:
    """bench.run's flags from a settings dict: True -> --name, False -> --no-name, else --name value."""
    argv = []
    for key, value in settings.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            argv.append(name)
        elif value is False:
            argv.append(f"--no-{key.replace('_', '-')}")
        elif value is not None:
            argv += [name, str(value)]
    return argv


def bench_run(overrides: dict | None = None, rehearse: dict | None = None):
    """A throughput-mode `bench.run` on synthetic data at the suite's size, with `overrides` (and, in
    the rehearsal, `rehearse` on top). Traces only where a step asks: images/s leaves the profiler's
    window out, but the window still costs time."""
    def command(suite: Suite, run_dir: Path) -> list[str]:
        settings = {"profile": "default", "dataset": "synthetic", "weights": "none", "augment": "none",
                    "loader": "torch", "precision": "bf16", "channels_last": True, "final_best": False,
                    "evaluate_best": False, "trace": False, **suite.size, **(overrides or {}),
                    **((rehearse or {}) if suite.mode == "rehearsal" else {}), "out": run_dir}
        return [sys.executable, "-m", "bench.run", *flags(settings)]
    return command


def study_command(suite: Suite, run_dir: Path) -> list[str]:
    """seed 000's whole study as the profile ships it (feature cache, final retrain of the best depth),
    on synthetic CIFAR-100-shaped data: synthetic splits are drawn apart, so 40,000 training and 10,000
    validation (and 10,000 test) images are CIFAR-100's split exactly."""
    if suite.mode == "rehearsal":
        settings = {"profile": "seed000-layerwise", "smoke": True, "device": "cpu"}
    else:
        settings = {"profile": "seed000-layerwise", "dataset": "synthetic", "num_classes": 100,
                    "train_size": 40_000, "val_size": 10_000, "weights": "none", "device": "cuda"}
    return [sys.executable, "-m", "bench.run", *flags({**settings, "out": run_dir})]


def probe_command(suite: Suite, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bench.suite", "--probe", str(run_dir / "environment.json"),
            *(["--rehearse"] if suite.mode == "rehearsal" else [])]


def loaders_command(suite: Suite, run_dir: Path) -> list[str]:
    """bench.loaders at the throughput runs' settings; a loader it cannot build here is a row with its
    reason, and the others are still measured."""
    keep = ("device", "image_size", "num_classes", "batch_size", "train_size", "val_size", "workers")
    settings = {"profile": "default", "dataset": "synthetic", "weights": "none", "augment": "none",
                "precision": "bf16", **{k: v for k, v in suite.size.items() if k in keep}}
    return [sys.executable, "-m", "bench.loaders", "--loaders", LOADERS, "--json", str(run_dir / "loaders.json"),
            *flags(settings)]


# The folder step's images: ImageNet-like JPEGs (shorter side about 375 px, quality 90), enough for
# the loaders' timed batches; the rehearsal's are small.
FOLDER_IMAGES = {"gpu": {"classes": 16, "per_class": 320, "size": 375}, "rehearsal": {"classes": 4, "per_class": 12, "size": 48}}


def make_folder_command(suite: Suite, run_dir: Path) -> list[str]:
    f = FOLDER_IMAGES[suite.mode]
    return [sys.executable, "-m", "bench.make_folder", str(run_dir / "images"), "--classes", str(f["classes"]),
            "--per-class", str(f["per_class"]), "--size", str(f["size"])]


def folder_loaders_command(suite: Suite, run_dir: Path) -> list[str]:
    """bench.loaders on the folder of JPEGs: DALI's decoder (mixed on the GPU), torch's (nvjpeg through
    torchvision.io) and torchvision's PIL workers, random-resized crop and flip at the run's size."""
    keep = ("device", "image_size", "batch_size", "workers")
    settings = {"profile": "default", "dataset": f"folder:{run_dir / 'images'}", "weights": "none",
                "augment": "flip-crop", "precision": "bf16", **{k: v for k, v in suite.size.items() if k in keep}}
    return [sys.executable, "-m", "bench.loaders", "--loaders", LOADERS, "--json", str(run_dir / "loaders.json"),
            *flags(settings)]


def timm_command(suite: Suite, run_dir: Path) -> list[str]:
    """timm's train benchmark on the throughput step's configuration: the same model, batch, image size
    and class count, bf16 autocast, channels_last, Adam, the same warm-up and timed steps.
    `--no-retry`: a smaller batch after an OOM would not be a peer."""
    s = suite.size
    return [sys.executable, str(Path(suite.args.timm_benchmark).resolve()), "--model", s["model"],
            "--bench", "train", "--batch-size", str(s["batch_size"]), "--img-size", str(s["image_size"]),
            "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--num-classes", str(s["num_classes"]),
            "--opt", "adam", "--num-warm-iter", str(s["warmup_steps"]),
            # timm logs every num_bench_iter // 5 iterations: fewer than 5 divides by zero
            "--num-bench-iter", str(max(5, s["steps"])), "--no-retry", "--device", s["device"],
            "--results-file", str(run_dir / "timm.json"), "--results-format", "json"]


def microbench_command(suite: Suite, run_dir: Path) -> list[str]:
    """tests/test_benchmarks.py's CUDA cases (ids `[cuda...]`); in the rehearsal two CPU cases."""
    select = "freeze_plan or (loader_batch and cpu-torch])" if suite.mode == "rehearsal" else "cuda"
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_benchmarks.py",
            "--benchmark-only", "-k", select, f"--benchmark-json={run_dir / 'benchmarks.json'}"]


def pytest_command(suite: Suite, run_dir: Path) -> list[str]:
    """The whole test suite on the GPU machine (its CUDA cases run there); in the rehearsal one test."""
    select = ["tests/test_benchmarks.py", "-k", "freeze_plan"] if suite.mode == "rehearsal" else []
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select,
            f"--junitxml={run_dir / 'junit.xml'}"]


def import_error(suite: Suite, module: str, where: Path = ROOT) -> str | None:
    """Why `module` does not import in a step's interpreter run from `where`, or None. Imported in a
    subprocess, once: an installed package can still fail to import (a missing CUDA library), and a
    checkout's own package counts where its script runs."""
    key = f"{module} in {where}"
    if key not in suite.imports:
        try:
            proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                  cwd=where, timeout=120)
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            suite.imports[key] = None if proc.returncode == 0 else f"`import {module}` fails here ({last})"
        except subprocess.TimeoutExpired:
            suite.imports[key] = f"`import {module}` did not finish in 120 s"
    return suite.imports[key]


def needs_module(module: str):
    return lambda suite: import_error(suite, module)


def timm_missing(suite: Suite) -> str | None:
    if not suite.args.timm_benchmark:
        return ("no --timm-benchmark PATH given (timm's benchmark.py is not part of the timm package: pass the "
                "script from a pytorch-image-models checkout)")
    return import_error(suite, "timm", Path(suite.args.timm_benchmark).resolve().parent)


# Limits: on the GPU about twice what each step should take on one H200 (compilation and seed 000's
# study are the long ones); in the rehearsal 3-5 times the time on 2 idle cores (about 100 s for all),
# so that a busy machine skips the last steps for the budget rather than stopping one half-way.
STEPS = (
    Step("environment", "device, driver and versions; bf16 matmul ceiling; device-to-device copy bandwidth",
         60, 30, probe_command, parse_environment),
    Step("throughput", "ResNet-50, 224 px, bf16, channels_last, torch loader, every depth, eager",
         180, 45, bench_run(), parse_run),
    Step("compile", "the same, --compile, unfreeze 1 and all", 300, 90,
         bench_run({"compile": True, "unfreeze": "1,all"}, rehearse={"unfreeze": "1"}), parse_run),
    # fp16 on a CPU is emulated: the rehearsal's time is mostly bench.run's fp16 ceiling
    Step("fp16", "the same, --precision fp16, unfreeze all", 90, 120,
         bench_run({"precision": "fp16", "unfreeze": "all"}), parse_run),
    Step("nchw", "the same, --no-channels-last, unfreeze all", 90, 30,
         bench_run({"channels_last": False, "unfreeze": "all"}), parse_run),
    Step("timm", "timm's benchmark.py --bench train on the same model, batch, size and precision",
         120, 40, timm_command, parse_timm, timm_missing),
    Step("loaders", "bench.loaders: dali, torch and torchvision alone", 120, 30, loaders_command, parse_loaders),
    Step("folder", "bench.loaders on a folder of JPEGs (bench.make_folder): decoding, random-resized crop, flip",
         240, 60, folder_loaders_command, parse_loaders, before=make_folder_command),
    Step("dali", "throughput with --loader dali, unfreeze 1 and all", 120, 45,
         bench_run({"loader": "dali", "unfreeze": "1,all"}), parse_run, needs_module("nvidia.dali")),
    Step("breakdown", "each depth's step phase by phase (--breakdown): input, frozen forward, trainable forward, "
                      "backward, optimizer", 120, 45,
         bench_run({"breakdown": True, "unfreeze": "1,6,12,25,all"}, rehearse={"unfreeze": "1,all"}), parse_run),
    Step("seed000", "--profile seed000-layerwise at full size on synthetic CIFAR-100-shaped data (--smoke rehearsed)",
         360, 60, study_command, parse_run),
    # Steps past the profiler's window (its 1 warm-up + --trace-steps, after the warm-up steps), or
    # images/s would time the profiler and bench.run warns: 10 > 1 + 3 on the GPU, 6 > 1 + 3 rehearsed.
    Step("trace", "one profiler trace per depth, and its summary", 180, 45,
         bench_run({"trace": True, "trace_steps": 3, "steps": 10, "warmup_steps": 5},
                   rehearse={"steps": 6, "warmup_steps": 1, "unfreeze": "1,all"}),
         parse_run),
    Step("microbench", "pytest --benchmark-only, the CUDA cases of tests/test_benchmarks.py", 480, 30,
         microbench_command, parse_microbench),
    Step("pytest", "the whole pytest suite on this machine", 600, 30, pytest_command, parse_pytest),
)
