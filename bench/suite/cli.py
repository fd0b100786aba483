"""The command line: flags, the parts and the output folder, and bad input refused in one line before
anything is written."""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench.args import Parser, positive_float
from bench.suite.merge import MergeError, merge_parts
from bench.suite.probe import nvidia_smi, probe
from bench.suite.runner import TRACE_CAP_MB, run_part
from bench.suite.steps import GPU, PART_LIMIT_S, PARTS, REHEARSAL, STEPS, Suite, part_limit_s


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (the help then says what happens)."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.suite", formatter_class=HelpFormatter,
               description="The standard GPU benchmark: its steps in parts that each fit one command on a GPU "
                           "machine (--part N), every step a subprocess with its own time limit; each part a "
                           "folder OUT/part-N (suite.json, SUMMARY.md, logs/, each run's results) and one .tar.gz "
                           "(into $OUT when set), and OUT's suite.json and SUMMARY.md merged over the parts.")
    g = p.add_argument_group("suite")
    g.add_argument("--part", type=int, default=None, metavar="N",
                   help=f"run part N only (1-{len(PARTS)}, see --list-steps); default: every part in order")
    g.add_argument("--out", default=None,
                   help="the suite folder; each part goes to OUT/part-N, which must be new or empty (default: "
                        "results/<device>/<UTC date>/, then <date>-2 ... when a part is taken)")
    g.add_argument("--budget", type=positive_float, default=None,
                   help="seconds for this command; a step whose time limit no longer fits is skipped (default: no "
                        f"cap: each part's limits already fit {PART_LIMIT_S} s)")
    g.add_argument("--steps", default=None, help="comma-separated steps to run, in the suite's order (default: all "
                                                 "of the parts run; see --list-steps)")
    g.add_argument("--list-steps", action="store_true", help="list the parts and steps with their time limits and exit")
    g.add_argument("--rehearse", action="store_true",
                   help="run every step's real command at CPU size on the CPU (ResNet-18, 32 px, a few steps)")
    g.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="join part folders (or suite folders holding part-N folders) into one suite.json and "
                        "SUMMARY.md in --out (default: the folder holding the parts), and exit")
    g = p.add_argument_group("peer and folder")
    g.add_argument("--timm-benchmark", default=None, metavar="PATH",
                   help="timm's benchmark.py (from a pytorch-image-models checkout; not in the timm package); "
                        "without it the timm step is skipped")
    g.add_argument("--max-trace-mb", type=positive_float, default=TRACE_CAP_MB,
                   help="profiler traces kept in a part's folder, MB in all; past it a variant's trace is dropped "
                        "(and the part's archive drops more if it would pass 16 MiB)")
    g = p.add_argument_group("internal")
    g.add_argument("--probe", default=None, metavar="FILE",
                   help="measure the environment into FILE (JSON) and exit: the environment step's own command")
    return p


def device_slug(rehearse: bool) -> str:
    name = "cpu-rehearsal" if rehearse else nvidia_smi("name") or "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(rehearse: bool, parts: list[int]) -> Path:
    """results/<device>/<UTC date>/, or the first of <date>-2, <date>-3 ... where none of `parts` is taken."""
    base = Path("results") / device_slug(rehearse) / f"{datetime.now(timezone.utc):%Y-%m-%d}"
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if all(free(out / f"part-{k}") for k in parts):
            return out


def free(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def check_out(out: Path, parts: list[int]) -> None:
    """Each part's folder must be new or empty, and OUT writable or creatable."""
    for k in parts:
        if not free(out / f"part-{k}"):
            raise UsageError(f"--out {out}: part-{k} exists and is not empty; choose a new folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {existing} is not a writable folder")
    target = os.environ.get("OUT")
    if target and not (Path(target).is_dir() and os.access(target, os.W_OK | os.X_OK)):
        raise UsageError(f"$OUT={target}: not a writable folder (each part's archive goes there)")


def resolve(args: argparse.Namespace, steps) -> dict[int, list[str]]:
    """Part number -> the steps to run in it, with the settings filled in; raises UsageError before
    anything is written."""
    names = [s.name for s in steps]
    numbers = sorted({s.part for s in steps})
    if args.part is not None and args.part not in numbers:
        raise UsageError(f"--part {args.part}: choose from {', '.join(map(str, numbers))}")
    wanted = [n.strip() for n in args.steps.split(",") if n.strip()] if args.steps is not None else names
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise UsageError(f"--steps: unknown step {', '.join(unknown) or '(none given)'}; choose from {', '.join(names)}")
    plan = {k: [s.name for s in steps if s.part == k and s.name in wanted]
            for k in numbers if args.part in (None, k)}
    plan = {k: v for k, v in plan.items() if v}
    if not plan:
        raise UsageError(f"--steps {args.steps}: none of them is in part {args.part}")
    if args.timm_benchmark and not Path(args.timm_benchmark).is_file():
        raise UsageError(f"--timm-benchmark {args.timm_benchmark}: no such file")
    args.out = str(Path(args.out) if args.out else default_out(args.rehearse, list(plan)))
    check_out(Path(args.out), list(plan))
    return plan


def print_steps(console: Console, steps) -> None:
    for part in PARTS:
        members = [s for s in steps if s.part == part.number]
        if not members:
            continue
        dali = " (after staging DALI)" if part.needs_dali else ""
        console.print(f"part {part.number}{dali}: {part.title}; at most {part_limit_s(steps, part.number):.0f} s "
                      f"on the GPU")
        for s in members:
            console.print(f"    {s.name:<12} {s.limit_s:>4} s on the GPU, {s.rehearse_limit_s:>3} s rehearsed: {s.what}")


def merge(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.merge]
    try:
        missing = [d for d in dirs if not d.is_dir()]
        if missing:
            raise MergeError(f"--merge {missing[0]}: no such folder")
        out = Path(args.out) if args.out else None
        if out is None:
            parents = {(d if any(d.glob("part-*/suite.json")) else d.parent).resolve() for d in dirs}
            if len(parents) != 1:
                raise MergeError("--merge: the parts are in different folders; say where the merge goes with --out")
            out = parents.pop()
        summary = merge_parts(dirs, out)
    except (MergeError, OSError) as e:
        print(f"bench.suite: error: {e}", file=sys.stderr)
        return 2
    print(f"bench.suite: merged into {summary} and {summary.with_name('suite.json')}")
    return 0


def main(argv: list[str] | None = None, steps=STEPS) -> int:
    args = get_args_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.probe:
        return probe(Path(args.probe), small=args.rehearse)
    if args.list_steps:
        print_steps(console, steps)
        return 0
    if args.merge:
        return merge(args)
    try:
        plan = resolve(args, steps)
    except UsageError as e:
        print(f"bench.suite: error: {e}", file=sys.stderr)
        return 2
    mode = "rehearsal" if args.rehearse else "gpu"
    codes, started = [], time.monotonic()
    for number, wanted in plan.items():
        # --budget is for the whole command: each part gets what the earlier ones left
        left = None if args.budget is None else max(0.0, args.budget - (time.monotonic() - started))
        suite = Suite(argparse.Namespace(**{**vars(args), "budget": left}),
                      (Path(args.out) / f"part-{number}").resolve(), mode, REHEARSAL if args.rehearse else GPU,
                      argv=sys.argv[1:] if argv is None else list(argv), part=number)
        codes.append(run_part(suite, [s for s in steps if s.part == number], wanted, console))
        if codes[-1] not in (0, 1):  # stopped: the parts after it are not started
            return codes[-1]
    return max(codes)
