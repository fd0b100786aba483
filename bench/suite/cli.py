"""The command line: flags, the output folder, and bad input refused in one line before anything is
written."""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench.args import Parser, positive_float
from bench.suite.probe import nvidia_smi, probe
from bench.suite.runner import BUDGET_S, TRACE_CAP_MB, run_suite
from bench.suite.steps import GPU, REHEARSAL, STEPS, Suite


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (the help then says what happens)."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.suite", formatter_class=HelpFormatter,
               description="The standard GPU benchmark in one command: every step a subprocess with its own "
                           "time limit, one folder (and OUT.tar.gz beside it) with suite.json, SUMMARY.md, logs/ "
                           "and each run's results.")
    g = p.add_argument_group("suite")
    g.add_argument("--out", default=None,
                   help="output folder, new or empty (default: results/<device>/<UTC date>/, -2, -3 ... when taken)")
    g.add_argument("--budget", type=positive_float, default=None,
                   help=f"seconds for the whole suite; a step whose time limit no longer fits is skipped (default: "
                        f"{BUDGET_S['gpu']:g} on the GPU, {BUDGET_S['rehearsal']:g} with --rehearse)")
    g.add_argument("--steps", default=None, help="comma-separated steps to run, in the suite's order (default: all; "
                                                 "see --list-steps)")
    g.add_argument("--list-steps", action="store_true", help="list the steps with their time limits and exit")
    g.add_argument("--rehearse", action="store_true",
                   help="run every step's real command at CPU size on the CPU (ResNet-18, 32 px, a few steps)")
    g = p.add_argument_group("peer and folder")
    g.add_argument("--timm-benchmark", default=None, metavar="PATH",
                   help="timm's benchmark.py (from a pytorch-image-models checkout; not in the timm package); "
                        "without it the timm step is skipped")
    g.add_argument("--max-trace-mb", type=positive_float, default=TRACE_CAP_MB,
                   help="profiler traces kept in the folder, MB in all; past it a variant's trace is dropped")
    g = p.add_argument_group("internal")
    g.add_argument("--probe", default=None, metavar="FILE",
                   help="measure the environment into FILE (JSON) and exit: the environment step's own command")
    return p


def device_slug(rehearse: bool) -> str:
    name = "cpu-rehearsal" if rehearse else nvidia_smi("name") or "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(rehearse: bool) -> Path:
    """results/<device>/<UTC date>/, or the first of <date>-2, <date>-3 ... not yet taken."""
    base = Path("results") / device_slug(rehearse) / f"{datetime.now(timezone.utc):%Y-%m-%d}"
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return out


def check_out(out: Path) -> None:
    """OUT must be new or empty, and OUT and its parent (the .tar.gz goes there) writable or creatable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder")
    for path in (out, out.parent):
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: {existing} is not a writable folder")


def resolve(args: argparse.Namespace, steps) -> list[str]:
    """The steps to run, with the settings filled in; raises UsageError before anything is written."""
    names = [s.name for s in steps]
    wanted = [n.strip() for n in args.steps.split(",") if n.strip()] if args.steps is not None else names
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise UsageError(f"--steps: unknown step {', '.join(unknown) or '(none given)'}; choose from {', '.join(names)}")
    if args.timm_benchmark and not Path(args.timm_benchmark).is_file():
        raise UsageError(f"--timm-benchmark {args.timm_benchmark}: no such file")
    args.budget = args.budget or BUDGET_S["rehearsal" if args.rehearse else "gpu"]
    args.out = str(Path(args.out) if args.out else default_out(args.rehearse))
    check_out(Path(args.out))
    return wanted


def print_steps(console: Console, steps) -> None:
    for i, s in enumerate(steps, 1):
        console.print(f"{i:2}. {s.name:<12} {s.limit_s:>4} s on the GPU, {s.rehearse_limit_s:>3} s rehearsed: {s.what}")


def main(argv: list[str] | None = None, steps=STEPS) -> int:
    args = get_args_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.probe:
        return probe(Path(args.probe), small=args.rehearse)
    if args.list_steps:
        print_steps(console, steps)
        return 0
    try:
        wanted = resolve(args, steps)
    except UsageError as e:
        print(f"bench.suite: error: {e}", file=sys.stderr)
        return 2
    suite = Suite(args, Path(args.out).resolve(), "rehearsal" if args.rehearse else "gpu",
                  REHEARSAL if args.rehearse else GPU, argv=sys.argv[1:] if argv is None else list(argv))
    return run_suite(suite, steps, wanted, console)
