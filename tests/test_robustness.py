"""Faults injected one by one: out of memory, a NaN loss, Ctrl-C, SIGTERM and kill -9 on a real process
followed by --resume, plus determinism (the fuzzed command line is tests/test_fuzz.py)."""
import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

import bench.sweep
import bench.variant
from bench.run import main
from bench.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32", "--workers", "1",
        "--epochs", "1"]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def oom_above(limit: int, error=torch.OutOfMemoryError, message="CUDA out of memory (injected for batch {})"):
    real = Trainer.step

    def step(self, images, labels):
        if images.shape[0] > limit:
            raise error(message.format(images.shape[0]))
        return real(self, images, labels)
    return step


def test_oom_fails_the_variant_with_its_batch_size(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "step", oom_above(16))
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3", "--out", str(out)]) == 1
    rows = results(out)["rows"]
    assert [r["status"] for r in rows] == ["oom", "oom"]  # the sweep went on after the first
    assert rows[0]["batch_size"] == 32 and "batch size 32" in rows[0]["error"]


def test_oom_retry_halves_the_batch_until_it_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "step", oom_above(8))
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1", "--oom", "retry", "--oom-scale-lr", "--lr", "0.004",
                 "--out", str(out)]) == 0
    row = results(out)["rows"][0]
    assert row["status"] == "ok" and row["batch_size"] == 8 and row["oom_batch_sizes"] == [32, 16]
    assert row["lr"] == pytest.approx(0.001)  # scaled with the batch: 0.004 * 8 / 32


def test_oom_retry_counts_cudnn_and_cublas_allocation_failures_as_out_of_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "step", oom_above(16, RuntimeError, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED ({})"))
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1", "--oom", "retry", "--out", str(out)]) == 0
    row = results(out)["rows"][0]
    assert row["status"] == "ok" and row["batch_size"] == 16 and row["oom_batch_sizes"] == [32]


def test_no_model_survives_into_the_next_variant(tmp_path, monkeypatch):
    built = []
    real_build = bench.variant.build_model

    def tracking_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model
    monkeypatch.setattr(bench.sweep, "build_model", tracking_build)
    monkeypatch.setattr(bench.variant, "build_model", tracking_build)
    monkeypatch.setattr(Trainer, "step", oom_above(16))  # the failing path must release memory too
    assert main([*TINY, "--unfreeze", "1,3", "--out", str(tmp_path / "run")]) == 1
    gc.collect()
    # one model for the plan, one per variant: none may still be alive
    assert len(built) == 3 and all(ref() is None for ref in built), "a model is still referenced"


def test_nan_stops_the_variant_at_the_step_it_happened(tmp_path, monkeypatch):
    real = Trainer.step

    def step(self, images, labels):
        loss = real(self, images, labels)
        return loss * float("nan") if self.steps_done == 3 else loss
    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3", "--out", str(out)]) == 1
    rows = results(out)["rows"]
    assert [r["status"] for r in rows] == ["nan", "nan"] and rows[0]["nan_step"] == 3
    assert "step 3" in rows[0]["error"]


def test_same_seed_same_losses():
    # Same seed: same data order, augmentation and initialisation. On the CPU the losses agree to
    # float32 rounding (1e-6 relative); a different seed gives different losses.
    def losses(seed):
        out = Path(os.environ["PYTEST_TMP"]) / f"seed{seed}-{time.monotonic_ns()}"
        assert main([*TINY, "--epochs", "2", "--unfreeze", "3", "--seed", str(seed), "--out", str(out)]) == 0
        return [h["train_loss"] for h in results(out)["rows"][0]["history"]]
    first, again, other = losses(1), losses(1), losses(2)
    assert first == pytest.approx(again, rel=1e-6)
    assert first != pytest.approx(other, rel=1e-3)


@pytest.fixture(autouse=True)
def _tmp_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_TMP", str(tmp_path))


def test_existing_out_needs_resume_and_resume_checks_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*TINY, "--unfreeze", "1", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*TINY, "--unfreeze", "1", "--batch-size", "16", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "batch_size: saved 32, now 16" in err and len(err.strip().splitlines()) == 1
    assert main([*TINY, "--unfreeze", "1", "--resume", str(out)]) == 0  # nothing left to run
    assert results(out)["run"]["resumed_rows"] == 1


def test_resume_alone_restores_the_saved_settings(tmp_path, capsys):
    """`--resume OUT` needs no other flag: the smoke run below is not the default profile (CIFAR-100,
    whose files are not here), yet the resumed run trains its missing variant with its settings."""
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3", "--out", str(out), "--no-evaluate-best"]) == 0
    doc = results(out)
    doc["rows"] = doc["rows"][:1]  # as if stopped after the first variant
    (out / "results.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["--resume", str(out), "--device", "cpu", "--no-evaluate-best"]) == 0, capsys.readouterr().err
    again = results(out)
    assert [r["variant"] for r in again["rows"]] == ["unfreeze-1", "unfreeze-3"]
    assert again["run"]["resumed_rows"] == 1 and again["run"]["profile"] == "smoke"
    assert again["rows"][1]["batch_size"] == 32 and again["run"]["train_images"] == doc["run"]["train_images"]
    # a setting given beside --resume must agree with the saved one
    assert main(["--resume", str(out), "--device", "cpu", "--epochs", "2"]) == 2
    assert "epochs: saved 1, now 2" in capsys.readouterr().err
    assert main(["--resume", str(out), "--profile", "default"]) == 2
    assert "profile: saved 'smoke', now 'default'" in capsys.readouterr().err


def test_resume_reads_a_schema_2_run_and_adds_its_wall_time(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3", "--out", str(out)]) == 0
    doc = results(out)
    # as schema 2 wrote it: no --compile-backend setting, no whole-run time; the second variant unfinished
    doc["schema_version"], doc["depths"] = 2, doc.pop("rows")[:1]
    for key in ("compile_backend", "wall_s", "device_hours", "tf32"):
        doc["run"].pop(key)
    doc["run"]["wall_s"] = 1000.0  # the earlier process's time
    (out / "results.json").write_text(json.dumps(doc))
    assert main([*TINY, "--unfreeze", "1,3", "--resume", str(out)]) == 0
    run = results(out)["run"]
    assert run["resumed_rows"] == 1 and run["earlier_wall_s"] == 1000.0 and run["wall_s"] > 1000.0


class _SignalInFinalizer:
    """Sends SIGINT to this process from inside a finalizer, where CPython swallows the exception it
    raises ("Exception ignored in ..."), as it does when a Ctrl-C lands in a DALI pipeline's __del__."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # bytecode after the signal: its handler runs (and raises) in here
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch):
    real, calls = Trainer.step, []

    def step(self, images, labels):
        calls.append(1)
        if len(calls) == 6:  # the second variant's second step
            _SignalInFinalizer()
        return real(self, images, labels)
    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "run"
    # Ctrl-C as an interactive Python gets it (a runner started in the background may ignore SIGINT)
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main([*TINY, "--unfreeze", "1,3,6", "--out", str(out)]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put Python's back
    finally:
        signal.signal(signal.SIGINT, launched_with)
    assert [r["status"] for r in results(out)["rows"]] == ["ok", "interrupted"]


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it, even when pytest was started ignoring it (a
    command run with `&` from a script ignores SIGINT, and Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bench.run", *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _wait_for_rows(out: Path, n: int, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(results(out)["rows"]) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail("the run did not finish a variant in time")


SLOW_SWEEP = ["--profile", "smoke", "--device", "cpu", "--train-size", "512", "--val-size", "64", "--batch-size", "32",
              "--workers", "1", "--epochs", "2", "--unfreeze", "1,3,6,12"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, status", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "interrupted"),
                                               (signal.SIGKILL, -9, None)], ids=["sigint", "sigterm", "kill-9"])
def test_signal_mid_sweep_then_resume_finishes_only_the_rest(tmp_path, sig, code, status):
    out = tmp_path / "run"
    proc = _start(SLOW_SWEEP, out)
    _wait_for_rows(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    saved = results(out)  # valid JSON whatever the moment
    finished = [r for r in saved["rows"] if r["status"] == "ok"]
    assert finished and finished[0]["variant"] == "unfreeze-1"
    if status:
        assert saved["rows"][-1]["status"] == status
    resumed = subprocess.run([sys.executable, "-m", "bench.run", *SLOW_SWEEP, "--resume", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = results(out)["rows"]
    assert [r["variant"] for r in rows] == ["unfreeze-1", "unfreeze-3", "unfreeze-6", "unfreeze-12"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0] == {**finished[0]}  # kept as it was, not rerun


def test_schema_validator_rejects_what_it_should():
    from bench.schema import validate_results
    from bench.schema import SCHEMA_VERSION
    out = {"schema_version": SCHEMA_VERSION, "run": {"model": "m", "dataset": "d", "batch_size": 1, "seed": 0,
                                                     "variants": [], "world_size": 1, "ceiling_tflops": 1.0,
                                                     "tf32": {}, "wall_s": 1.0, "device_hours": 0.0003,
                                        "env": {k: "" for k in ("python", "torch", "torchvision", "dali", "cuda",
                                                                "device", "device_count")}}, "rows": [],
           "aggregates": []}
    assert validate_results(out) == []
    assert validate_results({**out, "aggregates": None}) == ["'aggregates' must be a list"]
    assert validate_results({**out, "aggregates": [{"variant": "v", "n": 1, "runs": 1, "seeds": [0], "failed": {},
                                                    "top1": {"mean": 1.0}}]}) == \
        ["aggregates[0].top1: missing 'std'", "aggregates[0].top1: missing 'min'", "aggregates[0].top1: missing 'max'",
         "aggregates[0].top1: missing 'n'"]
    assert validate_results({**out, "schema_version": 0}) == ["schema_version is 0"]
    bad_row = {"variant": "v", "kind": "depth", "unfreeze": 1, "unit": "module", "trainable_params": 1,
               "trainable_tensors": 1, "trainable_layers": [], "seed": 0, "status": "ok", "error": None}
    errors = validate_results({**out, "rows": [bad_row]})
    assert any("missing 'images_per_s'" in e for e in errors) and any("needs top1" in e for e in errors)
    assert any("status 'weird'" in e for e in validate_results({**out, "rows": [{**bad_row, "status": "weird"}]}))
    # a throughput row is ok without accuracy; a training row is not
    throughput = {**bad_row, "mode": "throughput", "top1": None}
    assert not any("needs top1" in e for e in validate_results({**out, "rows": [throughput]}))
