"""Profiler traces: a bounded torch.profiler window per variant, written for TensorBoard's profiler
plugin, and read back into a summary (top operators by device time, the share the device sat idle).

The window is recorded once and kept to a few steps: a few steps of ResNet-50 are a few MB gzipped,
while a trace of hundreds of MB makes the plugin show empty views. The traced steps are slower (the
profiler's overhead and the export), so the sweep leaves them out of its throughput figures (`TraceWindow.steps`).
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

PROFILER_WARMUP = 1            # steps the profiler runs but discards (its own start-up cost)
TRACE_WARN_BYTES = 50 * 2**20  # above this the plugin gets slow or shows empty views
# cuDNN's layout transposes: with channels_last end to end there should be none in a training step.
LAYOUT_KERNELS = re.compile(r"nchwToNhwc|nhwcToNchw", re.IGNORECASE)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class TraceWindow:
    wait: int
    warmup: int
    active: int

    @property
    def steps(self) -> range:
        """The run's steps (0-based) the profiler slows down: its warm-up, the recorded steps and the
        export, which happens inside the last recorded step's interval."""
        return range(self.wait, self.wait + self.warmup + self.active)


def plan_window(total_steps: int, skip: int, active: int) -> TraceWindow | None:
    """The window for a variant of `total_steps` steps: after `skip` warm-up steps, `active` recorded.
    A run too short for that gets a smaller window and a warning; shorter than 2 steps, no trace."""
    if total_steps < 1 + PROFILER_WARMUP:
        warnings.warn(f"--trace: {total_steps} step(s) are too few to trace (needs at least {1 + PROFILER_WARMUP}); "
                      "no trace for this variant", stacklevel=2)
        return None
    window = TraceWindow(skip, PROFILER_WARMUP, active)
    if skip + PROFILER_WARMUP + active > total_steps:
        fit_active = min(active, total_steps - PROFILER_WARMUP)
        window = TraceWindow(max(0, total_steps - PROFILER_WARMUP - fit_active), PROFILER_WARMUP, fit_active)
        warnings.warn(f"--trace: the run has {total_steps} steps, fewer than the {skip} warm-up + {PROFILER_WARMUP} + "
                      f"{active} traced the schedule needs; tracing steps {window.wait + PROFILER_WARMUP + 1}.."
                      f"{window.wait + PROFILER_WARMUP + fit_active} instead", stacklevel=2)
    # images/s leaves the profiler's steps out; with none left, it would time the profiler's overhead
    untraced = max(0, window.wait - skip) + total_steps - (window.wait + PROFILER_WARMUP + window.active)
    if untraced <= 0:
        warnings.warn(f"--trace: every timed step of this variant's {total_steps} is inside the profiler's window, "
                      f"so its images/s includes the profiler's overhead; train at least "
                      f"{skip + PROFILER_WARMUP + active + 1} steps, or lower --trace-steps", stacklevel=2)
    return window


class VariantTrace:
    """The profiler around one variant's training; `step()` after every training step. A failure to
    write the trace is a warning, never the variant's failure: the measurements go on."""

    def __init__(self, run_dir: Path, window: TraceWindow, device: torch.device, worker: str = "rank0"):
        # A resumed variant starts its trace afresh. Under data parallelism every rank traces into the same
        # run, as worker `rank<r>`; no rank can get to its traced steps before the others got here
        # (DDP's first step waits for all), so this never removes another rank's new trace.
        shutil.rmtree(run_dir, ignore_errors=True)
        self.run_dir, self.window, self.export_s, self.worker = run_dir, window, 0.0, worker
        handler = tensorboard_trace_handler(str(run_dir), worker_name=worker, use_gzip=True)

        def on_ready(prof):
            start = time.perf_counter()
            try:
                handler(prof)
            except OSError as e:
                warnings.warn(f"--trace: could not write the trace to {run_dir} ({e.strerror or e})", stacklevel=2)
            self.export_s = time.perf_counter() - start
            for f in trace_files(run_dir):
                if f.stat().st_size > TRACE_WARN_BYTES:
                    warnings.warn(f"--trace: {f} is {f.stat().st_size / 2**20:.0f} MB, too large for the profiler "
                                  "plugin to show; use fewer --trace-steps", stacklevel=2)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # Shapes and memory for the plugin's operator and memory views; no Python stacks (they multiply
        # the trace size several times over).
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False,
                                schedule=schedule(wait=window.wait, warmup=window.warmup, active=window.active,
                                                  repeat=1),
                                on_trace_ready=on_ready)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        return self.profiler.__exit__(*exc)

    def step(self) -> None:
        self.profiler.step()


# reading a trace back

def trace_files(run_dir: Path, worker: str | None = None) -> list[Path]:
    """The traces in a run, or only those of `worker` (a run traced by several ranks has one per rank)."""
    return sorted(run_dir.glob(f"{worker + '.' if worker else ''}*.pt.trace.json*"))


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) covered by (start_us, end_us) intervals that may overlap."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _self_times(ops: list[dict]) -> list[tuple[str, float]]:
    """(name, self time in us) of nested CPU operators: each op's duration minus its direct children's,
    per thread, so aten::conv2d -> aten::convolution -> mkldnn_convolution is not counted three times."""
    out = []
    by_thread: dict = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, children's total]
        for e in events:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                parent, children = stack.pop()
                out.append((parent["name"], parent["dur"] - children))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        out.extend((parent["name"], parent["dur"] - children) for parent, children in stack)
    return out


def summarise_trace(run_dir: Path, top: int = 10, worker: str | None = None) -> dict | None:
    """The trace's top operators by device time and the device's idle share over the traced steps.

    On CUDA the device is the GPU: kernels, copies and memsets, idle = the part of the traced window
    with none of them running. On the CPU the device is the CPU itself: operators by self time, idle =
    the part of the window with no operator running on any thread (Python, the loader, the profiler)."""
    files = trace_files(run_dir, worker)
    if not files:
        return None
    events = [e for e in load_events(files[-1]) if e.get("ph") == "X" and "dur" in e]
    # The host's step annotations; on CUDA the trace repeats them on the GPU timeline (gpu_user_annotation).
    steps = [e for e in events if e["name"].startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation"]
    device_ops = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    on_gpu = bool(device_ops)
    if on_gpu:
        timed = [(e["name"], e["dur"]) for e in device_ops]
        busy = [(e["ts"], e["ts"] + e["dur"]) for e in device_ops]
    else:
        cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
        timed = _self_times(cpu_ops)
        busy = [(e["ts"], e["ts"] + e["dur"]) for e in cpu_ops]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in steps] or busy
    if not spans:
        return None
    # The GPU runs behind the host: its last kernels may end after the last step's host-side end.
    start, end = min(a for a, _ in spans), max(b for _, b in spans + busy)
    window_ms = (end - start) / 1e3
    busy_ms = _union_ms([(max(a, start), min(b, end)) for a, b in busy if b > start and a < end])
    totals: dict[str, list] = {}
    for name, dur in timed:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += dur
    device_total = sum(t for _, t in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "device": "cuda" if on_gpu else "cpu",
        "file": str(files[-1]),
        "bytes": files[-1].stat().st_size,
        "steps": len(steps),
        "window_ms": round(window_ms, 3),
        "busy_ms": round(busy_ms, 3),
        "idle_pct": round(100.0 * max(0.0, 1.0 - busy_ms / window_ms), 2) if window_ms > 0 else None,
        "layout_copies": sum(1 for name, _ in timed if LAYOUT_KERNELS.search(name)),
        "top": [{"name": name, "calls": calls, "total_ms": round(us / 1e3, 3), "pct": round(100.0 * us / device_total, 2)}
                for name, (calls, us) in ranked],
    }
