"""The sweep keeps going past a failed variant, records why, and measures throughput-only runs."""
import json

import pytest
import torch

import bench.sweep
from bench.run import main
from bench.train import Trainer

TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32", "--workers", "1"]


def test_failed_variant_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = bench.sweep.VariantRun

    def flaky(settings, ctx, variant, *args, **kwargs):
        if variant.name == "unfreeze-3":
            raise RuntimeError("boom in the middle")
        return real(settings, ctx, variant, *args, **kwargs)
    monkeypatch.setattr(bench.sweep, "VariantRun", flaky)
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3,6", "--epochs", "1", "--out", str(out)]) == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "RuntimeError: boom in the middle" and "flaky" in rows[1]["traceback"]
    assert rows[1]["trainable_tensors"] == 5  # the plan is kept: fc, layer4.1.bn2, layer4.1.conv2
    assert rows[2]["top1"] is not None


def test_non_finite_loss_is_status_nan(tmp_path, monkeypatch):
    real_step = Trainer.step

    def poisoned(self, images, labels):
        return real_step(self, images, labels) * float("nan")
    monkeypatch.setattr(Trainer, "step", poisoned)
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1", "--epochs", "1", "--out", str(out)]) == 1
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "nan" and "nan" in row["error"]


def test_steps_mode_trains_exactly_that_many_steps(tmp_path):
    out = tmp_path / "run"
    # 128 images / batch 32 = 4 steps per epoch: 6 steps run into a second, truncated epoch
    assert main([*TINY, "--unfreeze", "1", "--max-steps", "6", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["steps"] == 6 and row["epochs"] == 2 and len(row["history"]) == 2


@pytest.mark.slow
def test_compiled_run_reports_compile_time(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "2", "--epochs", "2", "--compile", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "ok", row.get("error")
    assert row["compile_s"] > 0 and row["images_per_s"] > 0
    torch._dynamo.reset()
