"""`python -m bench.suite`: the whole suite rehearsed on the CPU, part by part, and its pieces (parts
and their merge, the archive cap, budget, failures, time limits, targets, bad input) with small
injected steps."""
import json
import os
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest

from bench.suite import cli
from bench.suite.figures import TARGETS, check_targets, compute_figures
from bench.suite.parse import ParseError, parse_loaders
from bench.suite.runner import ARCHIVE_CAP_MB
from bench.suite.steps import GPU, PART_LIMIT_S, PARTS, REHEARSAL, STEPS, Step, Suite, part_limit_s
from bench.suite.summary import info_lines, run_row_line, target_lines
from bench.trace import plan_window

ROOT = Path(__file__).resolve().parent.parent


def fake_step(name: str, code: str, limit: int = 30, figures: dict | None = None, part: int = 1) -> Step:
    """A step whose command is `python -c code RUN_DIR` and whose figures are `figures` (or a parse failure)."""
    def parse(out, run_dir, log):
        if figures is None:
            raise ParseError("no figures")
        return figures
    return Step(name, f"fake step {name}", limit, limit, lambda s, run_dir: [sys.executable, "-c", code, str(run_dir)],
                parse, part=part)


def run_main(argv: list[str], steps=STEPS) -> int:
    try:
        return cli.main(argv, steps=steps)
    except SystemExit as e:  # argparse's own errors
        return e.code


def records(out: Path) -> dict:
    return {s["name"]: s for s in json.loads((out / "suite.json").read_text())["steps"]}


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_leaves_one_shareable_folder(tmp_path):
    out, back = tmp_path / "suite", tmp_path / "back"  # back: the GPU machine's $OUT, what comes home
    back.mkdir()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.suite", "--rehearse", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OUT": str(back)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert time.monotonic() - started < sum(part_limit_s(STEPS, p.number, "rehearsal") for p in PARTS)
    doc = json.loads((out / "suite.json").read_text())
    steps = records(out)
    assert list(steps) == [s.name for s in STEPS]
    assert [p["part"] for p in doc["parts"]] == [p.number for p in PARTS] and doc["parts_missing"] == []
    for name, step in steps.items():
        if step["status"] == "skipped":
            assert step["reason"], name
            continue
        assert step["status"] == "ok", (name, step.get("reason"), step.get("log_tail"))
        assert (out / step["log"]).is_file() and step["command"][0] == sys.executable and step["figures"]
    assert "--timm-benchmark" in steps["timm"]["reason"] and steps["timm"]["status"] == "skipped"
    # bench.run's own results travel with the folder, and the figures are read from them
    assert (out / "part-1" / "runs" / "throughput" / "results.json").is_file()
    assert steps["throughput"]["figures"]["results"] == "part-1/runs/throughput/results.json"
    assert doc["figures"]["all_images_per_s"] > 0 and doc["figures"]["unfreeze1_images_per_s"] > 0
    assert doc["figures"]["loader_speedup"] > 0 and doc["figures"]["data_wait_pct"] >= 0
    assert steps["compile"]["figures"]["rows"]["unfreeze-1"]["compile_s"] > 0
    assert steps["compile"]["figures"]["rows"]["unfreeze-1"]["compile_cache_misses"] > 0
    # the step ran with compile caches of its own, in its part's folder (deleted after it)
    assert steps["compile"]["env"]["TORCHINDUCTOR_CACHE_DIR"] == str((out / "part-3" / "compile-cache" / "compile" / "inductor").resolve())
    assert doc["environment"]["matmul_bf16_tflops"] > 0 and doc["environment"]["copy_gbps"] > 0
    assert steps["loaders"]["figures"]["json"] == "part-2/runs/loaders/loaders.json"  # its --json, not its table
    assert set(steps["loaders"]["figures"]["loaders"]) == {"torch", "torchvision"}
    assert steps["loaders"]["figures"]["loaders"]["torch"]["images_per_s"] > 0
    if steps["folder"]["status"] == "ok":  # the loaders on JPEG files bench.make_folder wrote, then removed
        assert list(steps["folder"]["figures"]["loaders"])[-1] == "dali"  # DALI last
        assert steps["folder"]["figures"]["loaders"]["torchvision"]["images_per_s"] > 0
        assert not (out / "part-4" / "runs" / "folder" / "images").exists()
    assert not (out / "part-3" / "compile-cache").exists()
    assert "every timed step" not in (out / steps["trace"]["log"]).read_text()
    assert {t["key"] for t in doc["targets"]} == {t.key for t in TARGETS}
    summary = (out / "SUMMARY.md").read_text()
    assert "| figure | measured | target | result | ceiling in the same run | notes |" in summary
    for target in TARGETS:
        assert target.label in summary
    assert "| timm | skipped |" in summary and "- part 6 (`part-6`)" in summary
    # one archive per part, each under the GPU machine's cap, and nothing else in $OUT
    archives = sorted(back.iterdir())
    assert [a.name.rsplit("-part-", 1)[1] for a in archives] == [f"{p.number}.tar.gz" for p in PARTS]
    assert all(a.name.startswith(f"{out.parent.name}-{out.name}-part-") for a in archives)
    assert all(a.stat().st_size <= ARCHIVE_CAP_MB * 2**20 for a in archives)
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
    assert "part-1/suite.json" in names and "part-1/SUMMARY.md" in names and "part-1/logs/throughput.log" in names
    # the parts, unpacked elsewhere as a GPU session brings them home, merge into the same summary
    home = tmp_path / "home"
    for archive in archives:
        with tarfile.open(archive) as tar:
            tar.extractall(home, filter="data")
    assert cli.main(["--merge", str(home)]) == 0
    merged = json.loads((home / "suite.json").read_text())
    assert merged["figures"] == doc["figures"] and [s["name"] for s in merged["steps"]] == list(steps)


def test_every_part_fits_one_command_on_the_gpu_machine_in_the_order_of_value():
    assert [p.number for p in PARTS] == sorted({s.part for s in STEPS})
    for part in PARTS:
        assert part_limit_s(STEPS, part.number) <= PART_LIMIT_S, part
    names = [s.name for s in STEPS]
    # the environment and the torch loader's throughput first, then seed 000's study; DALI only in the
    # parts that come after every torch-only part, pytest alone and last
    assert names[:3] == ["environment", "throughput", "seed000"]
    dali = {s.name for s in STEPS if "dali" in f"{s.name} {s.what}".lower()}
    assert {"loaders-dali", "dali", "folder"} <= dali
    first_dali_part = min(p.number for p in PARTS if p.needs_dali)
    assert all(next(s for s in STEPS if s.name == n).part >= first_dali_part for n in dali), dali
    assert all(not p.needs_dali for p in PARTS if p.number < first_dali_part)
    assert [s.name for s in STEPS if s.part == PARTS[-1].number] == ["pytest"]


def _suite(mode: str) -> Suite:
    args = cli.get_args_parser().parse_args(["--rehearse"] if mode == "rehearsal" else [])
    return Suite(args, Path("/tmp/out"), mode, REHEARSAL if mode == "rehearsal" else GPU)


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "s"
    steps = (fake_step("boom", "import sys; print('the device caught fire'); sys.exit(3)"),
             fake_step("silent", "pass"),  # exits 0 but leaves nothing to read
             fake_step("after", "print('fine')", figures={"images_per_s": 1.0}))
    assert run_main(["--rehearse", "--out", str(out)], steps) == 1
    boom, silent, after = records(out).values()
    assert boom["status"] == "failed" and boom["returncode"] == 3
    assert "exit code 3: the device caught fire" in boom["reason"]
    assert "the device caught fire" in boom["log_tail"]
    assert "the device caught fire" in (out / boom["log"]).read_text()
    assert silent["status"] == "failed" and "left no figures" in silent["reason"]
    assert after["status"] == "ok" and after["figures"] == {"images_per_s": 1.0}
    summary = (out / "SUMMARY.md").read_text()
    assert "| boom | failed |" in summary and "| after | ok |" in summary
    assert (out / "part-1.tar.gz").is_file() and (out / "part-1" / "SUMMARY.md").is_file()


def test_a_step_runs_its_before_command_first_and_a_failing_one_fails_the_step(tmp_path):
    """The folder step writes its images first: the step's command sees them, its images are not kept,
    and a failure writing them is the step's failure, with that command's log."""
    out = tmp_path / "s"
    write = "import pathlib, sys; d = pathlib.Path(sys.argv[1]) / 'images'; d.mkdir(); (d / 'x.jpg').write_text('x')"
    read = "import pathlib, sys; print('saw', sorted(p.name for p in pathlib.Path(sys.argv[1], 'images').iterdir()))"
    parse = lambda out, run_dir, log: {"log": log.read_text().splitlines()[-1]}
    fail = "import sys; print('disk full'); sys.exit(4)"
    steps = (Step("both", "before, then the command", 30, 30, lambda s, d: [sys.executable, "-c", read, str(d)],
                  parse, before=lambda s, d: [sys.executable, "-c", write, str(d)]),
             Step("broken", "the before command fails", 30, 30, lambda s, d: [sys.executable, "-c", "print('ran')"],
                  parse, before=lambda s, d: [sys.executable, "-c", fail]))
    assert run_main(["--rehearse", "--out", str(out)], steps) == 1
    both, broken = records(out).values()
    assert both["status"] == "ok" and both["figures"] == {"log": "saw ['x.jpg']"}
    assert not (out / "runs" / "both" / "images").exists()
    assert broken["status"] == "failed" and broken["returncode"] == 4 and "disk full" in broken["reason"]
    assert "ran" not in (out / broken["log"]).read_text()


def test_a_step_whose_limit_exceeds_what_remains_is_skipped_and_listed(tmp_path):
    out = tmp_path / "s"
    steps = (fake_step("first", "import time; time.sleep(1.5)", limit=5, figures={}),
             fake_step("long", "pass", limit=9, figures={}),   # 9 s limit, about 8.5 s left: skipped
             fake_step("short", "pass", limit=5, figures={}))  # still fits: runs
    assert run_main(["--rehearse", "--out", str(out), "--budget", "10"], steps) == 0
    first, long, short = records(out).values()
    assert first["status"] == "ok" and short["status"] == "ok"
    assert long["status"] == "skipped" and long["reason"].startswith("budget: needs up to 9 s")
    assert long["log"] is None and not (out / "part-1" / "logs" / "long.log").exists()
    assert "| long | skipped |" in (out / "SUMMARY.md").read_text()


def test_the_budget_is_for_the_whole_command_across_parts(tmp_path):
    out = tmp_path / "s"
    steps = (fake_step("first", "import time; time.sleep(2)", limit=4, figures={}, part=1),
             fake_step("later", "pass", limit=4, figures={}, part=2))  # about 3 s of 5 left: skipped
    assert run_main(["--rehearse", "--out", str(out), "--budget", "5"], steps) == 0
    assert records(out)["first"]["status"] == "ok"
    assert records(out)["later"]["status"] == "skipped" and records(out)["later"]["reason"].startswith("budget")


def test_a_step_over_its_limit_is_stopped_with_its_whole_process_group(tmp_path):
    out, pid_file = tmp_path / "s", tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.monotonic()
    assert run_main(["--rehearse", "--out", str(out)], (fake_step("hang", code, limit=3),)) == 1
    assert time.monotonic() - started < 20
    (hang,) = records(out).values()
    assert hang["status"] == "timeout" and "over its 3 s limit" in hang["reason"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the step's own child outlived it"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_targets_pass_and_fail_on_hand_made_figures():
    figures = {"all_images_per_s": 8000.0, "unfreeze1_images_per_s": 29_999.0, "loader_speedup": 5.0,
               "data_wait_pct": 2.0, "dali_loader_speedup": 4.9, "dali_data_wait_pct": 0.5,
               "study_gpu_minutes": None, "compile_overhead_pct": 10.5, "timm_ratio": 1.02}
    results = {t["key"]: t["result"] for t in check_targets(figures)}
    assert results == {"all_images_per_s": "pass",        # >= is inclusive
                       "unfreeze1_images_per_s": "fail",
                       "loader_speedup": "pass", "data_wait_pct": "fail",  # < 2 % is strict
                       "dali_loader_speedup": "fail", "dali_data_wait_pct": "pass",
                       "study_gpu_minutes": "no data", "compile_overhead_pct": "fail", "timm_ratio": "pass"}


def _run_record(rows: dict, run: dict | None = None, status: str = "ok", seconds: float = 100.0) -> dict:
    return {"status": status, "seconds": seconds,
            "figures": {"run": run or {}, "rows": {f"unfreeze-{d}": {"unfreeze": d, "status": "ok", **r}
                                                   for d, r in rows.items()}}}


def test_figures_are_computed_from_the_steps_records():
    depths = {d: {"images_per_s": 1000.0, "data_wait_pct": 0.5} for d in ("1", "3", "6", "12", "15", "25")}
    depths["1"] = {"images_per_s": 2000.0, "data_wait_pct": 1.5}
    depths["all"] = {"images_per_s": 800.0, "data_wait_pct": 0.1}
    recs = {"throughput": _run_record(depths, {"loader_images_per_s": 12_000.0}),
            "compile": _run_record({"1": {"images_per_s": 1.0, "compile_s": 20.0},
                                    "all": {"images_per_s": 1.0, "compile_s": 40.0}}),
            "timm": {"status": "ok", "figures": {"train_samples_per_sec": 1000.0}},
            "seed000": _run_record({}, {"wall_s": 90.0}, seconds=130.0)}
    figures = compute_figures(recs)
    assert figures["all_images_per_s"] == 800.0 and figures["unfreeze1_images_per_s"] == 2000.0
    assert figures["loader_speedup"] == 6.0 and figures["data_wait_pct"] == 1.5
    assert figures["timm_ratio"] == 0.8
    assert figures["study_gpu_minutes"] == 1.5  # bench.run's whole-run wall time, not the subprocess's
    assert "`run.wall_s`" in " ".join(target_lines(recs, figures))
    # 6 depths x 15 epochs x (40,000 / img/s + 10,000 / unfreeze 1's img/s), against 6 x the mean compile_s
    study_s = 15 * (40_000 / 2000 + 10_000 / 2000) + 5 * 15 * (40_000 / 1000 + 10_000 / 2000)
    assert figures["compile_overhead_pct"] == pytest.approx(100 * 6 * 30.0 / study_s, rel=1e-3)
    assert figures["dali_loader_speedup"] is None and figures["dali_data_wait_pct"] is None
    # without bench.run's whole-run figures, the subprocess's wall time; a study that failed has none
    assert compute_figures({"seed000": _run_record({}, {}, seconds=120.0)})["study_gpu_minutes"] == 2.0
    assert compute_figures({"seed000": _run_record({}, {}, status="timeout")})["study_gpu_minutes"] is None


FAKE_TIMM = '''
import argparse, json
p = argparse.ArgumentParser()
for flag in ("--model", "--bench", "--amp-dtype", "--device", "--opt", "--results-file", "--results-format"):
    p.add_argument(flag)
for flag in ("--batch-size", "--img-size", "--num-classes", "--num-warm-iter", "--num-bench-iter"):
    p.add_argument(flag, type=int)
for flag in ("--amp", "--channels-last", "--no-retry"):
    p.add_argument(flag, action="store_true")
a = p.parse_args()
assert a.bench == "train" and a.amp and a.amp_dtype == "bfloat16" and a.channels_last and a.no_retry
assert a.num_bench_iter >= 5  # timm logs every num_bench_iter // 5 iterations
result = {"model": a.model, "train_samples_per_sec": 123.4, "train_step_time": 64.8,
          "train_batch_size": a.batch_size, "train_img_size": a.img_size, "param_count": 11.18}
if WRITE_FILE:
    json.dump(result, open(a.results_file, "w"))
print("--result")
print(json.dumps(result, indent=4))
'''


@pytest.mark.parametrize("write_file", [True, False], ids=["results-file", "stdout"])
def test_timm_step_runs_the_peer_script_with_its_flags_and_reads_its_result(tmp_path, write_file):
    checkout = tmp_path / "pytorch-image-models"
    (checkout / "timm").mkdir(parents=True)
    (checkout / "timm" / "__init__.py").write_text("")  # the checkout's own timm is what the script imports
    script = checkout / "benchmark.py"
    script.write_text(FAKE_TIMM.replace("WRITE_FILE", str(write_file)))
    out = tmp_path / "s"
    assert run_main(["--rehearse", "--steps", "timm", "--timm-benchmark", str(script), "--out", str(out)]) == 0
    timm = records(out)["timm"]
    assert timm["status"] == "ok", timm
    assert timm["figures"]["train_samples_per_sec"] == 123.4
    assert timm["figures"]["train_batch_size"] == REHEARSAL["batch_size"]
    assert json.loads((out / "suite.json").read_text())["figures"]["timm_images_per_s"] == 123.4
    assert records(out)["loaders"]["reason"] == "not in --steps"  # its part's other steps
    assert "throughput" not in records(out)  # part 1 did not run


@pytest.mark.parametrize("argv, message", [
    (["--steps", "throughput,nope"], "--steps: unknown step nope"),
    (["--steps", ","], "--steps: unknown step (none given)"),
    (["--budget", "0"], "--budget: expected a positive number"),
    (["--budget", "soon"], "--budget: expected a number"),
    (["--budget", "nan"], "--budget: expected a positive number"),
    (["--timm-benchmark", "/nonexistent/benchmark.py"], "no such file"),
    (["--part", "9"], "--part 9: choose from 1, 2, 3, 4, 5, 6"),
    (["--part", "one"], "--part: invalid int value"),
    (["--part", "2", "--steps", "throughput"], "--steps throughput: none of them is in part 2"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "s"
    assert run_main(["--rehearse", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_part_folder_that_is_not_empty_or_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    (taken / "part-1").mkdir(parents=True)
    (taken / "part-1" / "keep.txt").write_text("earlier results")
    assert run_main(["--rehearse", "--part", "1", "--out", str(taken)]) == 2
    assert "part-1 exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["part-1"]
    under_a_file = tmp_path / "taken" / "part-1" / "keep.txt" / "suite"
    assert run_main(["--rehearse", "--out", str(under_a_file)]) == 2
    err = capsys.readouterr().err
    assert "is not a writable folder" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("OUT", str(tmp_path / "no-such-folder"))
    assert run_main(["--rehearse", "--out", str(tmp_path / "fresh")]) == 2
    assert "$OUT=" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_the_default_folder_is_per_device_and_date_and_never_reuses_a_part(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = cli.default_out(rehearse=True, parts=[1])
    assert first.parts[:2] == ("results", "cpu-rehearsal") and len(first.name) == len("2026-01-31")
    (first / "part-1").mkdir(parents=True)
    (first / "part-1" / "suite.json").write_text("{}")
    assert cli.default_out(rehearse=True, parts=[2]) == first  # part 2 of the same day goes beside part 1
    assert cli.default_out(rehearse=True, parts=[1]) == first.with_name(first.name + "-2")


def test_parts_run_one_at_a_time_merge_into_one_summary(tmp_path, monkeypatch):
    """The GPU session's way: one command per part, each leaving one archive in $OUT; at home the
    archives unpack side by side and --merge joins them, as running the parts in one command does."""
    back = tmp_path / "back"
    back.mkdir()
    monkeypatch.setenv("OUT", str(back))
    steps = (fake_step("first", "print('one')", figures={"a": 1}, part=1),
             fake_step("second", "print('two')", figures={"b": 2}, part=2))
    out = tmp_path / "gpu" / "2026-12-06"
    assert run_main(["--rehearse", "--part", "2", "--out", str(out)], steps) == 0
    doc = json.loads((out / "suite.json").read_text())  # merged so far: part 2 alone
    assert [p["part"] for p in doc["parts"]] == [2] and doc["parts_missing"][0] == 1
    assert run_main(["--rehearse", "--part", "1", "--out", str(out)], steps) == 0
    assert sorted(a.name for a in back.iterdir()) == ["gpu-2026-12-06-part-1.tar.gz", "gpu-2026-12-06-part-2.tar.gz"]
    assert list(records(out)) == ["first", "second"]  # in part order, whatever the order they ran in
    assert records(out)["second"]["log"] == "part-2/logs/second.log"
    home = tmp_path / "home"
    for archive in back.iterdir():
        with tarfile.open(archive) as tar:
            tar.extractall(home, filter="data")
    assert run_main(["--merge", str(home / "part-1"), str(home / "part-2")]) == 0
    assert list(records(home)) == ["first", "second"]
    assert "- part 1 (`part-1`)" in (home / "SUMMARY.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--merge", "/nonexistent/part-1"], "no such folder"),
    (["--merge", "EMPTY"], "neither a part's folder nor a folder of part-N folders"),
])
def test_bad_merge_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    assert run_main([a.replace("EMPTY", str(tmp_path / "empty")) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_part_whose_archive_would_pass_the_cap_gives_up_its_traces_then_cuts_its_logs(tmp_path, monkeypatch):
    """Only files of at most 16 MiB come back from the GPU machine: the part's archive is made to fit,
    and suite.json says what was given up."""
    monkeypatch.setattr("bench.suite.runner.ARCHIVE_CAP_MB", 1.0)
    noise = ("import os, pathlib, sys; d = pathlib.Path(sys.argv[1]) / 'traces' / 'unfreeze-1'; d.mkdir(parents=True); "
             "(d / 'rank0.pt.trace.json.gz').write_bytes(os.urandom(3 * 2**20)); "
             "sys.stdout.buffer.write(os.urandom(3 * 2**20).hex().encode())")
    out = tmp_path / "s"
    assert run_main(["--rehearse", "--out", str(out), "--max-trace-mb", "100"],
                    (fake_step("loud", noise, figures={"x": 1}),)) == 0
    archive = out / "part-1.tar.gz"
    assert archive.stat().st_size <= 2**20
    cut = json.loads((out / "part-1" / "suite.json").read_text())["archive_cut"]
    assert cut[0].startswith("runs/loud/traces/unfreeze-1") and "logs/loud.log (cut to its last MiB)" in cut
    assert "cut to fit its archive" in (out / "SUMMARY.md").read_text()


def test_the_compile_step_is_skipped_in_seconds_without_a_c_compiler(tmp_path, monkeypatch):
    """Triton (and inductor's C++) compile at run time: without a compiler the step is a skip with its
    reason, not minutes spent on a compile that cannot finish."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc, clang, c++, g++ ...
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "s"
    started = time.monotonic()
    assert run_main(["--rehearse", "--steps", "compile", "--out", str(out)]) == 0
    assert time.monotonic() - started < 30
    compile_step = records(out)["compile"]
    assert compile_step["status"] == "skipped" and "needs a C compiler" in compile_step["reason"]


def test_the_compile_step_compiles_from_empty_caches_of_its_own():
    s = _suite("gpu")
    step = next(step for step in STEPS if step.name == "compile")
    env = step.env(s, Path("/tmp/out/runs/compile"))
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/out/compile-cache/")
    assert env["TRITON_CACHE_DIR"].startswith("/tmp/out/compile-cache/")


def test_commands_match_the_brief_on_the_gpu():
    """The GPU commands, built without running them: what each step will ask of bench.run."""
    args = cli.get_args_parser().parse_args(["--timm-benchmark", __file__])
    s = Suite(args, Path("/tmp/out"), "gpu", GPU)
    steps = {step.name: step for step in STEPS}
    for mode in ("gpu", "rehearsal"):
        study = steps["seed000"].command(_suite(mode), Path("/tmp/st"))
        assert "--no-trace" in study and study[study.index("--loader") + 1] == "torch", mode
    throughput = steps["throughput"].command(s, Path("/tmp/out/runs/throughput"))
    assert throughput[1:3] == ["-m", "bench.run"]
    text = " ".join(throughput)
    for part in ("--profile default", "--dataset synthetic", "--weights none", "--loader torch", "--precision bf16",
                 "--channels-last", "--no-final-best", "--no-evaluate-best", "--no-trace", "--device cuda",
                 "--model resnet50", "--image-size 224", "--batch-size 256", "--steps 50", "--warmup-steps 10",
                 "--unfreeze 1,3,6,12,15,25,all"):
        assert part in text, part
    assert GPU["train_size"] >= (GPU["steps"] + GPU["warmup_steps"]) * GPU["batch_size"]
    compiled = " ".join(steps["compile"].command(s, Path("/tmp/c")))
    assert "--compile" in compiled and "--unfreeze 1,all" in compiled
    assert "--precision fp16" in " ".join(steps["fp16"].command(s, Path("/tmp/f")))
    assert "--no-channels-last" in " ".join(steps["nchw"].command(s, Path("/tmp/n")))
    traced = steps["trace"].command(s, Path("/tmp/t"))
    assert "--trace" in traced and "--no-trace" not in traced
    study = " ".join(steps["seed000"].command(s, Path("/tmp/st")))
    assert "--profile seed000-layerwise" in study and "--train-size 40000 --val-size 10000" in study
    assert "--smoke" not in study
    assert "--no-trace" in study and "--loader torch" in study  # the throughput step's loader, no profiler
    assert "--loaders torch,torchvision" in " ".join(steps["loaders"].command(s, Path("/tmp/l")))
    assert "--loaders dali" in " ".join(steps["loaders-dali"].command(s, Path("/tmp/ld")))
    assert "-k cuda" in " ".join(steps["microbench"].command(s, Path("/tmp/m")))
    folder = " ".join(steps["folder"].before(s, Path("/tmp/fo")))
    assert "-m bench.make_folder /tmp/fo/images" in folder
    loaders = " ".join(steps["folder"].command(s, Path("/tmp/fo")))
    assert "--dataset folder:/tmp/fo/images" in loaders and "--augment flip-crop" in loaders and "--device cuda" in loaders
    assert "--loaders torch,torchvision,dali" in loaders  # DALI last
    timm = steps["timm"].command(s, Path("/tmp/timm"))
    assert timm[1] == __file__ and "--amp-dtype bfloat16" in " ".join(timm)


def test_a_row_shows_the_device_memory_beside_torchs_and_the_ceiling_in_its_dtype():
    gib = 2**30
    recs = {"throughput": _run_record({"all": {"images_per_s": 900.0, "mfu": 0.4, "peak_mem_bytes": 30 * gib,
                                               "device_peak_mem_bytes": 34 * gib}},
                                      {"ceiling_tflops": 400.0, "precision": "fp32", "ceiling_dtype": "tf32"}),
            "dali": _run_record({"1": {"images_per_s": 5000.0, "peak_mem_bytes": 8 * gib,
                                       "device_peak_mem_bytes": 12 * gib}}),
            "seed000": _run_record({"1": {"images_per_s": 700.0, "tail_images_per_s": 9000.0,
                                          "peak_mem_bytes": gib, "device_peak_mem_bytes": None}}),
            "compile": _run_record({"1": {"images_per_s": 1.0, "compile_s": 20.0, "compile_graphs": 2,
                                          "compile_cache_hits": 0, "compile_cache_misses": 4,
                                          "warmup_peak_mem_bytes": 40 * gib, "warmup_device_peak_mem_bytes": 44 * gib}})}
    lines = {line.split(" | ")[0]: line for line in info_lines(recs)}
    assert "peak 30.00 GiB (torch), 34.00 GiB (device)" in lines["| throughput: unfreeze-all"]
    assert "400 TFLOP/s tf32, MFU 40.0 %" in lines["| throughput: unfreeze-all"]
    assert "peak 8.00 GiB (torch), 12.00 GiB (device)" in lines["| dali: unfreeze-1"]
    seed = lines["| seed000: unfreeze-1"]
    assert "(device)" not in seed and "tail 9,000 img/s" in seed and "| 700 img/s |" in seed
    assert "compile 20.00 s, 2 graphs, cache 0 hits / 4 misses" in lines["| compile: unfreeze-1"]
    assert "warm-up 40.00 GiB, 44.00 GiB (device)" in lines["| compile: unfreeze-1"]  # autotuning, apart
    failed = run_row_line(recs, "throughput", "unfreeze-3", {"status": "oom", "error": "CUDA out of memory | x"})
    assert failed == "| throughput: unfreeze-3 | oom | – | – | – | CUDA out of memory / x |"


def _loaders_json(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "loaders.json").write_text(json.dumps({"device": "cpu", "batch_size": 8, "rows": rows}))


def test_the_loaders_step_reads_its_json_and_a_loader_it_could_not_build_says_why(tmp_path):
    run_dir, log = tmp_path / "runs" / "loaders", tmp_path / "loaders.log"
    log.write_text("│ torch │ 117,869 │ 0.14 │ 13 │ 1.00x │\n")  # a printed table alone is not read
    with pytest.raises(ParseError):
        parse_loaders(tmp_path, run_dir, log)
    _loaders_json(run_dir, [
        {"loader": "dali", "loader_images_per_s": None, "loader_batch_ms_median": None, "loader_batches": 0,
         "error": "--loader dali: NVIDIA DALI cannot be imported"},
        {"loader": "torch", "loader_images_per_s": 1000.0, "loader_batch_ms_median": 8.0, "loader_batches": 50}])
    figures = parse_loaders(tmp_path, run_dir, log)
    assert figures["json"] == "runs/loaders/loaders.json"
    assert figures["loaders"]["torch"] == {"images_per_s": 1000.0, "batch_ms_median": 8.0, "batches": 50}
    assert figures["loaders"]["dali"]["error"] == "not measured: --loader dali: NVIDIA DALI cannot be imported"
    lines = info_lines({"loaders": {"status": "ok", "figures": figures}})
    assert "| loaders: dali alone | – | – | – | – | not measured: --loader dali: NVIDIA DALI cannot be imported |" in lines
    assert "| loaders: torch alone | 1,000 img/s | – | – | – | batch 8.00 ms |" in lines


def test_without_dali_the_torch_loaders_are_measured_and_only_the_dali_steps_are_skipped(tmp_path, monkeypatch):
    (tmp_path / "hide").mkdir()  # every step's interpreter (and its import check) then fails `import nvidia.dali`
    (tmp_path / "hide" / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "hide"),
                                                                   os.environ.get("PYTHONPATH")])))
    out = tmp_path / "s"
    assert run_main(["--rehearse", "--steps", "loaders,loaders-dali,dali", "--out", str(out)]) == 0
    steps = records(out)
    loaders = steps["loaders"]
    assert loaders["status"] == "ok", loaders
    assert "--json" in loaders["command"] and "--loaders" in loaders["command"]
    assert loaders["figures"]["loaders"]["torch"]["images_per_s"] > 0
    for name in ("loaders-dali", "dali"):
        assert steps[name]["status"] == "skipped" and "import nvidia.dali" in steps[name]["reason"]
    assert "| loaders-dali | skipped |" in (out / "SUMMARY.md").read_text()


@pytest.mark.parametrize("size", [GPU, REHEARSAL], ids=["gpu", "rehearsal"])
def test_the_trace_step_times_steps_outside_the_profilers_window(size):
    """bench.run warns, and times only the profiler, when its window covers every timed step."""
    args = cli.get_args_parser().parse_args(["--rehearse"] if size is REHEARSAL else [])
    s = Suite(args, Path("/tmp/out"), "rehearsal" if size is REHEARSAL else "gpu", size)
    argv = next(step for step in STEPS if step.name == "trace").command(s, Path("/tmp/t"))
    value = {flag: int(argv[argv.index(flag) + 1]) for flag in ("--steps", "--warmup-steps", "--trace-steps")}
    assert value["--steps"] > value["--warmup-steps"] + 1 + value["--trace-steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window = plan_window(value["--warmup-steps"] + value["--steps"], value["--warmup-steps"], value["--trace-steps"])
    assert window is not None and window.active == value["--trace-steps"]
