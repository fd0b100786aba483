"""The steps, in priority order and grouped into parts: the command each runs in its own process, how
its figures are read back, and when it cannot run here; and the two sizes they run at.

A part is what one command on the GPU machine runs (at most 600 s there, and only the files under $OUT
come back): its steps' time limits, their kill grace and the suite's start-up fit in PART_LIMIT_S. The
parts go in the order of value, so a session that runs out of device time has the figures that matter
most; the ones that need DALI come after the parts that need only torch, so that DALI is staged only
once those figures are safe."""
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
from bench.toolchain import compile_toolchain_missing

ROOT = Path(__file__).resolve().parents[2]  # the steps run here, so `-m bench.run` is this checkout's

# The GPU's: timm's defaults where they exist (batch 256, 10 warm-up steps), 50 timed steps (timm
# times 40); 16,384 training images cover the 60 steps in one epoch, so no epoch boundary (a loader
# restart) falls inside the timed steps. The rehearsal's: the same commands, as small as runs.
GPU = {"device": "cuda", "model": "resnet50", "image_size": 224, "num_classes": 100, "batch_size": 256,
       "train_size": 16384, "val_size": 256, "steps": 50, "warmup_steps": 10, "unfreeze": "1,3,6,12,15,25,all"}
REHEARSAL = {"device": "cpu", "model": "resnet18", "image_size": 32, "num_classes": 10, "batch_size": 8,
             "train_size": 32, "val_size": 16, "steps": 2, "warmup_steps": 1, "unfreeze": "1,3,6,12,15,25,all",
             "workers": 1}
# DALI is measured last or in a process of its own: it has never run on the GPU, and a crash or a hang
# there must not cost the torch and torchvision rows.
TORCH_LOADERS, DALI_LOADER, FOLDER_LOADERS = "torch,torchvision", "dali", "torch,torchvision,dali"

COMPILE_CACHE = "compile-cache"  # in a part's folder while its steps run
PART_LIMIT_S = 540      # one command on the GPU machine: 600 s, less the transfers
STARTUP_S = 20          # the suite's own start-up and its packing at the end
IMPORT_CHECK_S = 30     # `import nvidia.dali` (once per part) in a step's interpreter: DALI loads in seconds
KILL_GRACE_S = {"gpu": 10.0, "rehearsal": 5.0}  # after SIGTERM bench.run writes what it finished


@dataclass(frozen=True)
class Part:
    number: int
    title: str
    needs_dali: bool = False   # run it after `../shared/device/README.md`'s DALI staging


@dataclass
class Suite:
    """What the steps see: the settings, the output folder and what earlier steps recorded."""
    args: argparse.Namespace
    out: Path
    mode: str                      # "gpu" or "rehearsal"
    size: dict
    argv: list = field(default_factory=list)
    part: int | None = None        # the part this folder holds
    archive_cut: list = field(default_factory=list)  # what was given up for the archive to fit
    started: float = field(default_factory=time.monotonic)
    started_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    records: dict = field(default_factory=dict)
    imports: dict = field(default_factory=dict)  # "module in folder" -> None when it imports, else why not

    def remaining_s(self) -> float:
        budget = self.args.budget if self.args.budget is not None else float("inf")
        return budget - (time.monotonic() - self.started)


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
    part: int = 1
    # environment variables for the step's processes, on top of the suite's own
    env: Callable[[Suite, Path], dict] | None = None
    import_check: bool = False     # skip_if imports a module in a subprocess (up to IMPORT_CHECK_S)

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
    validation (and 10,000 test) images are CIFAR-100's split exactly. The throughput step's loader and
    no profiler trace: the trace step measures those, and here they would only add to the study's time."""
    common = {"profile": "seed000-layerwise", "loader": "torch", "trace": False}
    if suite.mode == "rehearsal":
        settings = {**common, "smoke": True, "device": "cpu"}
    else:
        settings = {**common, "dataset": "synthetic", "num_classes": 100, "train_size": 40_000, "val_size": 10_000,
                    "weights": "none", "device": "cuda"}
    return [sys.executable, "-m", "bench.run", *flags({**settings, "out": run_dir})]


def probe_command(suite: Suite, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bench.suite", "--probe", str(run_dir / "environment.json"),
            *(["--rehearse"] if suite.mode == "rehearsal" else [])]


def loaders_command(loaders: str):
    """bench.loaders at the throughput runs' settings; a loader it cannot build here is a row with its
    reason, and the others are still measured."""
    def command(suite: Suite, run_dir: Path) -> list[str]:
        keep = ("device", "image_size", "num_classes", "batch_size", "train_size", "val_size", "workers")
        settings = {"profile": "default", "dataset": "synthetic", "weights": "none", "augment": "none",
                    "precision": "bf16", **{k: v for k, v in suite.size.items() if k in keep}}
        return [sys.executable, "-m", "bench.loaders", "--loaders", loaders, "--json", str(run_dir / "loaders.json"),
                *flags(settings)]
    return command


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
    return [sys.executable, "-m", "bench.loaders", "--loaders", FOLDER_LOADERS, "--json",
            str(run_dir / "loaders.json"), *flags(settings)]


def cold_compile_caches(suite: Suite, run_dir: Path) -> dict:
    """Fresh inductor (FX graph, AOTAutograd) and Triton caches of the step's own: `compile_s` is then a
    user's first compilation, not a hit on what an earlier run left in /tmp. Beside the run's folder,
    not in it (inductor makes its folder as it starts, and bench.run wants its --out empty); `prune`
    drops them."""
    cache = suite.out / COMPILE_CACHE / run_dir.name
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}


def toolchain_missing(suite: Suite) -> str | None:
    """torch.compile builds C (Triton's launchers on CUDA, inductor's C++ on the CPU) at run time: a
    missing compiler or Python.h is found here in milliseconds, not after minutes of a failing step."""
    return compile_toolchain_missing(suite.size["device"])


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
                                  cwd=where, timeout=IMPORT_CHECK_S)
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            suite.imports[key] = None if proc.returncode == 0 else f"`import {module}` fails here ({last})"
        except subprocess.TimeoutExpired:
            suite.imports[key] = f"`import {module}` did not finish in {IMPORT_CHECK_S} s"
    return suite.imports[key]


def needs_module(module: str):
    return lambda suite: import_error(suite, module)


def timm_missing(suite: Suite) -> str | None:
    if not suite.args.timm_benchmark:
        return ("no --timm-benchmark PATH given (timm's benchmark.py is not part of the timm package: pass the "
                "script from a pytorch-image-models checkout)")
    return import_error(suite, "timm", Path(suite.args.timm_benchmark).resolve().parent)


PARTS = (
    Part(1, "torch loader: the environment, every depth's training throughput, seed 000's study"),
    Part(2, "torch loader: the loaders alone, fp16, NCHW, each depth phase by phase, timm's peer"),
    Part(3, "torch.compile from a cold cache; one profiler trace per depth"),
    Part(4, "DALI: the DALI loader alone and training with it; the loaders on a folder of JPEGs", needs_dali=True),
    Part(5, "the micro-benchmarks (pytest --benchmark-only, CUDA cases; the DALI ones need it staged)",
         needs_dali=True),
    Part(6, "the whole pytest suite on this machine"),
)

# Limits: on the GPU about twice what each step should take on one H100 or H200 (compilation and seed
# 000's study are the long ones), within PART_LIMIT_S per part; in the rehearsal 3-5 times the time on
# 2 idle cores.
STEPS = (
    Step("environment", "device, driver and versions; bf16 matmul ceiling; device-to-device copy bandwidth",
         40, 30, probe_command, parse_environment, part=1),
    Step("throughput", "ResNet-50, 224 px, bf16, channels_last, torch loader, every depth, eager",
         170, 45, bench_run(), parse_run, part=1),
    Step("seed000", "--profile seed000-layerwise at full size on synthetic CIFAR-100-shaped data, torch loader, "
                    "no trace (--smoke rehearsed)", 280, 90, study_command, parse_run, part=1),
    Step("loaders", "bench.loaders: torch and torchvision alone", 60, 30, loaders_command(TORCH_LOADERS),
         parse_loaders, part=2),
    # fp16 on a CPU is emulated: the rehearsal's time is mostly bench.run's fp16 ceiling
    Step("fp16", "the same, --precision fp16, unfreeze all", 75, 120,
         bench_run({"precision": "fp16", "unfreeze": "all"}), parse_run, part=2),
    Step("nchw", "the same, --no-channels-last (NCHW batches and model), unfreeze all", 75, 30,
         bench_run({"channels_last": False, "unfreeze": "all"}), parse_run, part=2),
    Step("breakdown", "each depth's step phase by phase (--breakdown): input, frozen forward, trainable forward, "
                      "backward, optimizer", 120, 60,
         bench_run({"breakdown": True, "unfreeze": "1,6,12,25,all"}, rehearse={"unfreeze": "1,all"}), parse_run,
         part=2),
    Step("timm", "timm's benchmark.py --bench train on the same model, batch, size and precision",
         100, 40, timm_command, parse_timm, timm_missing, part=2, import_check=True),
    Step("compile", "the same, --compile from empty compile caches, unfreeze 1 and all", 300, 90,
         bench_run({"compile": True, "unfreeze": "1,all"}, rehearse={"unfreeze": "1"}), parse_run,
         toolchain_missing, part=3, env=cold_compile_caches),
    # Steps past the profiler's window (its 1 warm-up + --trace-steps, after the warm-up steps), or
    # images/s would time the profiler and bench.run warns: 10 > 1 + 3 on the GPU, 6 > 1 + 3 rehearsed.
    Step("trace", "one profiler trace per depth, and its summary", 150, 45,
         bench_run({"trace": True, "trace_steps": 3, "steps": 10, "warmup_steps": 5},
                   rehearse={"steps": 6, "warmup_steps": 1, "unfreeze": "1,all"}),
         parse_run, part=3),
    Step("loaders-dali", "bench.loaders: dali alone, in a process of its own", 60, 30, loaders_command(DALI_LOADER),
         parse_loaders, needs_module("nvidia.dali"), part=4, import_check=True),
    Step("dali", "throughput with --loader dali, unfreeze 1 and all", 120, 45,
         bench_run({"loader": "dali", "unfreeze": "1,all"}), parse_run, needs_module("nvidia.dali"), part=4,
         import_check=True),
    Step("folder", "bench.loaders on a folder of JPEGs (bench.make_folder): decoding, random-resized crop, flip; "
                   "torch, torchvision, then dali", 240, 60, folder_loaders_command, parse_loaders,
         before=make_folder_command, part=4),
    Step("microbench", "pytest --benchmark-only, the CUDA cases of tests/test_benchmarks.py", 480, 30,
         microbench_command, parse_microbench, part=5),
    Step("pytest", "the whole pytest suite on this machine", 500, 30, pytest_command, parse_pytest, part=6),
)


def part_limit_s(steps, number: int, mode: str = "gpu") -> float:
    """The longest a part can take: its start-up, its import check, and each step's limit and kill grace."""
    members = [s for s in steps if s.part == number]
    return (STARTUP_S + IMPORT_CHECK_S * any(s.import_check for s in members)
            + sum((s.limit_s if mode == "gpu" else s.rehearse_limit_s) + KILL_GRACE_S[mode] for s in members))
