"""Profiler traces: the window, the summary read back from a trace file, and tracing in a real run."""
from __future__ import annotations

import gzip
import json
import warnings

import pytest

from bench.trace import TraceWindow, _self_times, _union_ms, plan_window, summarise_trace


def test_window_after_warmup_when_the_run_is_long_enough():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window = plan_window(total_steps=100, skip=5, active=3)
    assert window == TraceWindow(5, 1, 3)
    assert list(window.steps) == [5, 6, 7, 8]  # profiler warm-up, 3 recorded steps


def test_short_run_gets_a_smaller_window_and_a_warning():
    with pytest.warns(UserWarning, match="fewer than"), pytest.warns(UserWarning, match="every timed step"):
        window = plan_window(total_steps=4, skip=5, active=3)
    assert window.wait + window.warmup + window.active <= 4 and window.active == 3


def test_a_window_over_every_timed_step_warns():
    # 1 warm-up + 4 timed steps: the profiler's warm-up and 3 recorded steps take all 4
    with pytest.warns(UserWarning, match="every timed step"):
        assert plan_window(total_steps=5, skip=1, active=3) == TraceWindow(1, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_window(total_steps=6, skip=1, active=3)  # one timed step left outside: no warning


def test_run_too_short_to_trace_warns_and_traces_nothing():
    with pytest.warns(UserWarning, match="too few to trace"):
        assert plan_window(total_steps=1, skip=0, active=3) is None


def test_union_counts_overlaps_once():
    assert _union_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)


def test_self_time_subtracts_direct_children():
    ops = [{"name": "conv2d", "ts": 0, "dur": 100, "tid": 1},
           {"name": "convolution", "ts": 10, "dur": 80, "tid": 1},
           {"name": "mkldnn", "ts": 20, "dur": 60, "tid": 1},
           {"name": "relu", "ts": 150, "dur": 10, "tid": 1}]
    assert dict(_self_times(ops)) == {"conv2d": 20, "convolution": 20, "mkldnn": 60, "relu": 10}


def write_trace(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_gpu_summary_ranks_kernels_and_measures_idle(tmp_path):
    # two 1 ms steps on the host; kernels cover 0.2-0.6 and 1.0-1.9 ms (overlapping pair), 2.0-2.1 ms
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#2", "ts": 1000, "dur": 1000},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#2", "ts": 1000, "dur": 1100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 900},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_conv", "ts": 200, "dur": 400},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_conv", "ts": 1000, "dur": 700},
        {"ph": "X", "cat": "kernel", "name": "nchwToNhwcKernel", "ts": 1500, "dur": 400},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 2000, "dur": 100},
    ]
    write_trace(tmp_path / "run" / "rank0.1.pt.trace.json.gz", events)
    s = summarise_trace(tmp_path / "run")
    assert s["device"] == "cuda" and s["steps"] == 2
    assert s["window_ms"] == pytest.approx(2.1)  # the last copy ends after the last host step
    assert s["busy_ms"] == pytest.approx(0.4 + 0.9 + 0.1)
    assert s["idle_pct"] == pytest.approx(100 * (1 - 1.4 / 2.1), abs=0.01)
    assert [op["name"] for op in s["top"]] == ["sm90_xmma_conv", "nchwToNhwcKernel", "Memcpy DtoD"]
    assert s["top"][0]["calls"] == 2 and s["top"][0]["total_ms"] == pytest.approx(1.1)
    assert s["layout_copies"] == 1


def test_no_trace_file_no_summary(tmp_path):
    assert summarise_trace(tmp_path) is None


TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32", "--workers", "1",
        "--loader", "torch", "--unfreeze", "1", "--no-evaluate-best"]


def test_unwritable_trace_dir_is_one_line_and_exit_2(tmp_path, capsys):
    from bench.run import main
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert main([*TINY, "--trace", "--trace-dir", str(blocked / "traces"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench.run: error: --trace-dir") and "not writable" in err and len(err.splitlines()) == 1


def test_run_too_short_to_trace_warns_and_finishes(tmp_path, recwarn):
    from bench.run import main
    out = tmp_path / "run"
    assert main([*TINY, "--trace", "--max-steps", "1", "--out", str(out)]) == 0
    assert any("too few to trace" in str(w.message) for w in recwarn)
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "ok" and "trace" not in row


def test_traced_steps_are_left_out_of_the_throughput_figures():
    from bench.config import parse_config
    from bench.variant import summarise
    from bench.train import EpochStats, EvalStats

    train = parse_config(["--warmup-steps", "2", "--batch-size", "10"]).settings.train
    # 12 steps of 10 ms; the profiler's window (steps 2..5) takes 500 ms each
    step_ms = [10.0] * 12
    window = TraceWindow(wait=2, warmup=1, active=3)
    for i in window.steps:
        step_ms[i] = 500.0
    epochs = [(EpochStats(loss=1.0, images=120, step_ms=step_ms, idle_ms=[0.0] * len(step_ms), wall_s=3.0),
               EvalStats(1.0, 50.0, 90.0, 20, [5.0, 5.0], 0.01))]
    traced = summarise(train, False, epochs, exclude=window.steps)
    assert traced["step_ms_median"] == 10.0 and traced["images_per_s"] == 1000.0
    assert summarise(train, False, epochs)["images_per_s"] < 100  # the same steps counted: the figure collapses
