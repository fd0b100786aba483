"""Running one part: each step in its own process group under its own limit, its failures recorded and
never raised; the part's suite.json and SUMMARY.md after every step; at the end one .tar.gz of the
part, at most ARCHIVE_CAP_MB (into $OUT when it is set: on the GPU machine the only files that come
back), and the merged suite.json and SUMMARY.md of every part in the suite folder."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench.files import atomic_write
from bench.signals import StopSignal, interrupt_exit_code
from bench.suite.figures import COMPILE_ESTIMATE, check_targets, compute_figures, step_figures
from bench.suite.merge import MergeError, merge_parts
from bench.suite.parse import ParseError
from bench.suite.steps import COMPILE_CACHE, KILL_GRACE_S, ROOT, Step, Suite
from bench.suite.summary import render_summary

TRACE_CAP_MB = 12.0     # per part; its archive must stay under ARCHIVE_CAP_MB with the logs and results
ARCHIVE_CAP_MB = 16.0   # the largest file the GPU machine sends back
LOG_KEEP_BYTES = 2**20  # a log cut to fit the archive keeps its last MiB
TAIL_LINES = 15


def run_process(argv: list[str], log: Path, limit_s: float, grace_s: float,
                extra_env: dict | None = None) -> tuple[str, int | None]:
    """Run `argv` into `log`; past `limit_s` stop its whole process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",  # a killed step keeps its log
           **(extra_env or {})}
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(argv)}\n\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s)
            return "timeout", proc.returncode
        except BaseException:  # Ctrl-C or SIGTERM of the suite: the step goes with it
            stop_group(proc, grace_s)
            raise
    # What the step left running in its group (compile workers, a stray child) must not hold the device
    # while the next step measures.
    signal_group(proc, signal.SIGKILL)
    return ("ok" if returncode == 0 else "failed"), returncode


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the group, SIGKILL to what is left after `grace_s`: the leader may be gone while
    workers it started are not."""
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc, signal.SIGKILL)
    proc.wait()


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the step's own group (start_new_session), no other
    except ProcessLookupError:
        pass


def blank_record(suite: Suite, step: Step, status: str, reason: str | None = None) -> dict:
    """A step's record in suite.json; every status has the same fields."""
    return {"name": step.name, "what": step.what, "status": status, "reason": reason, "limit_s": step.limit(suite),
            "seconds": 0.0, "command": None, "returncode": None, "log": None, "figures": {}}


def skip_reason(suite: Suite, step: Step) -> str | None:
    reason = step.skip_if(suite)
    if reason:
        return reason
    if step.limit(suite) > suite.remaining_s():
        return (f"budget: needs up to {step.limit(suite)} s, {max(0, suite.remaining_s()):.0f} s of "
                f"--budget {suite.args.budget:g} left")
    return None


def run_step(suite: Suite, step: Step) -> dict:
    """One step: skipped (its reason or the budget), or run and parsed; its record for suite.json."""
    limit, record = step.limit(suite), blank_record(suite, step, "skipped")
    reason = skip_reason(suite, step)
    if reason:
        return {**record, "reason": reason}
    run_dir, log = suite.out / "runs" / step.name, suite.out / "logs" / f"{step.name}.log"
    run_dir.mkdir(parents=True)  # empty: bench.run refuses only a folder that is not
    argv = step.command(suite, run_dir)
    env = step.env(suite, run_dir) if step.env is not None else None
    started = time.monotonic()
    status, returncode = "ok", 0
    if step.before is not None:
        before = step.before(suite, run_dir)
        status, returncode = run_process(before, log.with_suffix(".before.log"), limit, KILL_GRACE_S[suite.mode],
                                         env)
        if status != "ok":
            argv, log = before, log.with_suffix(".before.log")
    if status == "ok":
        status, returncode = run_process(argv, log, max(1.0, limit - (time.monotonic() - started)),
                                         KILL_GRACE_S[suite.mode], env)
    record.update(command=argv, status=status, returncode=returncode, seconds=round(time.monotonic() - started, 1),
                  log=str(log.relative_to(suite.out)), env=env)
    try:  # a failed or stopped run may still have left figures: bench.run writes after every variant
        record["figures"] = step.parse(suite.out, run_dir, log)
    except (ParseError, OSError, ValueError, KeyError, TypeError) as e:
        record["parse_error"] = f"{type(e).__name__}: {e}"
        if status == "ok":
            record["status"] = "failed"
    if record["status"] != "ok":
        record["log_tail"] = tail(log)
        record["reason"] = failure_reason(record, limit)
    prune(suite, run_dir, record)
    return record


def failure_reason(record: dict, limit: int) -> str:
    if record["status"] == "timeout":
        return f"over its {limit} s limit; its process group was stopped"
    if record["returncode"] == 0:
        return f"exited 0 but left no figures ({record.get('parse_error')})"
    last = next((line.strip() for line in reversed(record["log_tail"]) if line.strip()), "")
    return f"exit code {record['returncode']}: {last[:300]}"


def tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 16384))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def prune(suite: Suite, run_dir: Path, record: dict) -> None:
    """Keep the folder shareable: no checkpoints (weights, not results), no generated images (inputs,
    not results), no compile caches, and the step's traces only while every trace kept so far fits in
    --max-trace-mb."""
    for name in ("checkpoints", "images"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    shutil.rmtree(suite.out / COMPILE_CACHE, ignore_errors=True)
    traces = sorted(p for p in (run_dir / "traces").glob("*") if p.is_dir())
    kept_mb = folder_mb(suite.out / "runs", "*/traces/**/*") - sum(folder_mb(p) for p in traces)  # other steps'
    dropped = []
    for trace_dir in traces:
        mb = folder_mb(trace_dir)
        if kept_mb + mb > suite.args.max_trace_mb:
            shutil.rmtree(trace_dir)
            dropped.append(f"{trace_dir.name} ({mb:.1f} MB)")
        else:
            kept_mb += mb
    if dropped:
        record["traces_dropped"] = f"over --max-trace-mb {suite.args.max_trace_mb:g}: {', '.join(dropped)}"


def folder_mb(path: Path, pattern: str = "**/*") -> float:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file()) / 2**20


def suite_document(suite: Suite) -> dict:
    figures = compute_figures(suite.records)
    return {"suite_version": 2, "mode": suite.mode, "part": suite.part, "argv": suite.argv, "out": str(suite.out),
            "started_utc": suite.started_utc, "updated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - suite.started, 1), "budget_s": suite.args.budget,
            "settings": {**suite.size, "timm_benchmark": suite.args.timm_benchmark,
                         "max_trace_mb": suite.args.max_trace_mb, "step_names": list(suite.records)},
            "environment": step_figures(suite.records, "environment"), "figures": figures,
            "targets": check_targets(figures), "compile_estimate": COMPILE_ESTIMATE,
            "archive_cut": suite.archive_cut, "steps": list(suite.records.values())}


def write_outputs(suite: Suite) -> None:
    doc = suite_document(suite)
    atomic_write(suite.out / "suite.json", json.dumps(doc, indent=2) + "\n")
    atomic_write(suite.out / "SUMMARY.md", render_summary(doc))


def pack(folder: Path, archive: Path) -> int:
    """`folder` as one .tar.gz at `archive` (its root named after the folder); its size in bytes."""
    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    atomic_write(archive, write)
    return archive.stat().st_size


def shrink(suite: Suite) -> str | None:
    """One thing less in the part's folder, so that its archive fits: the largest trace folder left,
    else the longest log cut to its last LOG_KEEP_BYTES; what went, or None when nothing is left to cut."""
    traces = [p for p in suite.out.glob("runs/*/traces/*") if p.is_dir()]
    if traces:
        largest = max(traces, key=folder_mb)
        what = f"{largest.relative_to(suite.out)} ({folder_mb(largest):.1f} MB)"
        shutil.rmtree(largest)
        return what
    logs = [p for p in suite.out.glob("logs/*.log") if p.stat().st_size > LOG_KEEP_BYTES]
    if logs:
        longest = max(logs, key=lambda p: p.stat().st_size)
        with open(longest, "rb") as f:
            f.seek(-LOG_KEEP_BYTES, os.SEEK_END)
            kept = f.read()
        atomic_write(longest, b"[... cut to its last MiB to fit the archive ...]\n" + kept)
        return f"{longest.relative_to(suite.out)} (cut to its last MiB)"
    return None


def archive_path(suite: Suite) -> Path:
    """Into $OUT when it is set (the GPU machine's way back), named so that parts of several devices and
    days do not collide; else beside the part's folder."""
    target = os.environ.get("OUT")
    if target:
        return Path(target) / f"{suite.out.parent.parent.name}-{suite.out.parent.name}-{suite.out.name}.tar.gz"
    return suite.out.with_name(suite.out.name + ".tar.gz")


def pack_part(suite: Suite) -> Path:
    """The part's archive, at most ARCHIVE_CAP_MB: traces, then the longest logs, are given up until it
    fits, and suite.json names each."""
    archive = archive_path(suite)
    while pack(suite.out, archive) > ARCHIVE_CAP_MB * 2**20:
        what = shrink(suite)
        if what is None:
            print(f"bench.suite: warning: {archive} is {archive.stat().st_size / 2**20:.1f} MiB, over "
                  f"{ARCHIVE_CAP_MB:g}")
            break
        suite.archive_cut.append(what)
        write_outputs(suite)
    return archive


def mark_interrupted(suite: Suite) -> None:
    for name, record in suite.records.items():
        if record["status"] == "running":
            log = suite.out / "logs" / f"{name}.log"
            record.update(status="interrupted", reason="the suite was stopped during this step",
                          log=str(log.relative_to(suite.out)) if log.exists() else None)


def run_steps(suite: Suite, steps: list[Step], console: Console) -> None:
    for i, step in enumerate(steps):
        console.print(f"[{i + 1}/{len(steps)}] {step.name}: {step.what}")
        suite.records[step.name]["status"] = "running"
        try:
            record = run_step(suite, step)
        except Exception as e:  # the suite's own code for this step failed: recorded, and on to the next
            record = blank_record(suite, step, "failed", f"the suite could not run it: {type(e).__name__}: {e}")
        suite.records[step.name] = record
        console.print(f"    {record['status']} in {record['seconds']:.0f} s"
                      + (f": {record['reason']}" if record.get("reason") else ""))
        write_outputs(suite)


def merge_suite(suite: Suite, console: Console) -> None:
    """The suite folder's summary over every part in it; a folder it cannot merge (parts of a rehearsal
    beside a GPU run's) costs the part nothing: its own folder and archive are written already."""
    try:
        merge_parts([suite.out.parent], suite.out.parent)
    except (MergeError, OSError) as e:
        console.print(f"bench.suite: warning: {suite.out.parent} not merged: {e}")


def run_part(suite: Suite, steps, wanted: list[str], console: Console) -> int:
    """Every step of the part in order (or skipped, saying why), its folder rewritten after each, packed
    at the end, and the suite folder's merged summary refreshed. Exit code: 0 when every step that ran
    is ok, 1 otherwise; 130 or 143 when stopped."""
    suite.records = {s.name: blank_record(suite, s, "pending") if s.name in wanted else
                     blank_record(suite, s, "skipped", "not in --steps") for s in steps}
    (suite.out / "logs").mkdir(parents=True, exist_ok=True)
    write_outputs(suite)
    console.print(f"bench.suite ({suite.mode}) part {suite.part}: {len(wanted)} steps -> {suite.out}")
    try:
        with StopSignal():  # the running step's process group is stopped and the folder written
            run_steps(suite, [s for s in steps if s.name in wanted], console)
    except KeyboardInterrupt as e:
        mark_interrupted(suite)
        write_outputs(suite)
        console.print(f"bench.suite: stopped; what finished is in {suite.out} and {pack_part(suite)}")
        merge_suite(suite, console)
        return interrupt_exit_code(e)
    archive = pack_part(suite)
    merge_suite(suite, console)
    ran = [r for r in suite.records.values() if r["status"] not in ("skipped", "pending")]
    console.print(f"bench.suite: part {suite.part}: {sum(r['status'] == 'ok' for r in ran)}/{len(ran)} steps ok; "
                  f"{suite.out / 'SUMMARY.md'}, {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    return 0 if all(r["status"] == "ok" for r in ran) else 1
