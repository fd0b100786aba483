"""The command line end to end: the results files of a sweep, the listing modes, and bad input."""
import csv
import json
import subprocess
import sys

import pytest

from bench.run import main

# A six-depth sweep small enough for a test: 16 steps per variant on 32 px synthetic images.
TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "256", "--val-size", "128", "--epochs", "2",
        "--batch-size", "32", "--workers", "1"]
ROW_FIELDS = {"unfreeze", "unit", "trainable_params", "trainable_layers", "status", "images_per_s",
              "eval_images_per_s", "step_ms_median", "data_wait_pct", "peak_mem_bytes", "compile_s", "epochs",
              "top1", "top5", "train_s", "gpu_hours", "acc_per_gpu_hour", "history"}
HISTORY_FIELDS = {"epoch", "train_loss", "val_loss", "top1", "top5", "elapsed_s"}


@pytest.mark.slow
def test_sweep_writes_every_field_for_six_depths(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3,6,12,15,25", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["unfreeze"] for r in rows] == [1, 3, 6, 12, 15, 25]
    for row in rows:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["status"] == "ok", row.get("error")
        assert row["images_per_s"] > 0 and row["eval_images_per_s"] > 0 and row["step_ms_median"] > 0
        assert 0 <= row["data_wait_pct"] <= 100
        assert row["peak_mem_bytes"] > 0 and row["gpu_hours"] > 0
        assert row["acc_per_gpu_hour"] == pytest.approx(row["top1"] / row["gpu_hours"], rel=1e-3)
        assert 0 <= row["top1"] <= row["top5"] <= 100
        assert len(row["history"]) == 2 and HISTORY_FIELDS <= row["history"][0].keys()
        assert len(row["trainable_layers"]) == row["unfreeze"]
    # more depth, more to train
    params = [r["trainable_params"] for r in rows]
    assert params == sorted(params) and len(set(params)) == 6
    run = result["run"]
    assert run["model"] == "resnet18" and run["dataset"] == "synthetic" and run["batch_size"] == 32
    assert {"python", "torch", "torchvision", "dali", "device", "device_count"} <= run["env"].keys()
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["unfreeze"] for r in table] == ["1", "3", "6", "12", "15", "25"]
    assert "images_per_s" in table[0] and "history" not in table[0]


def test_flags_override_the_profile(tmp_path, capsys):
    assert main(["--profile", "smoke", "--device", "cpu", "--model", "resnet34", "--unfreeze", "2,all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resnet34" in out and "unfreeze-2" in out and "unfreeze-all" in out
    assert "unfreeze-25" not in out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert main(["--model", "resnet50", "--unfreeze", "1,3,6,12,15,25", "--dry-run", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for depth, tensors in [(1, 2), (3, 5), (6, 10), (12, 19), (15, 25), (25, 40)]:
        assert f"unfreeze-{depth}" in out
        assert any(line.split("│")[7].strip() == str(tensors) for line in out.splitlines()
                   if f"unfreeze-{depth} " in line)
    assert not out_dir.exists()


def test_list_layers_numbers_from_the_output_end(capsys):
    assert main(["--model", "resnet50", "--unit", "module", "--list-layers"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    first = [cell.strip() for cell in lines[0].strip("│").split("│")]
    third = [cell.strip() for cell in lines[2].strip("│").split("│")]
    assert first[:2] == ["1", "fc"] and third[:2] == ["3", "layer4.2.conv3"]
    assert len(lines) == 103  # 53 BN + 49 conv (shortcut convs counted with their BN) + fc
    tensors = [int(line.strip("│").split("│")[3]) for line in lines]
    assert sum(tensors) == 161  # every parameter tensor of resnet50 exactly once


def test_list_profiles(capsys):
    assert main(["--list-profiles"]) == 0
    out = capsys.readouterr().out
    assert "smoke" in out and "default" in out


BAD_INPUT = [
    (["--model", "resnet51"], "unknown model 'resnet51'"),
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose from: cifar10, cifar100, synthetic, folder:PATH"),
    (["--dataset", "folder:/no/such/folder"], "--dataset folder:/no/such/folder: no such directory"),
    (["--unit", "neuron"], "invalid choice: 'neuron'"),
    (["--unfreeze", "1,,x"], "malformed --unfreeze"),
    (["--unfreeze", "0"], "malformed --unfreeze"),
    (["--model", "resnet50", "--unfreeze", "1,104"], "resnet50 has 103 layers with --unit module"),
    (["--unit", "stage", "--unfreeze", "7"], "has 6 layers with --unit stage"),
    (["--batch-size", "0"], "expected an integer in 1..65,536, got 0"),
    (["--batch-size", "-8"], "expected an integer in 1..65,536, got -8"),
    (["--train-size", "9999999"], "expected an integer in 1..200,000, got 9,999,999"),
    (["--workers", "100000"], "expected an integer in 0..64"),
    (["--seed", "-1"], "expected an integer in 0..4,294,967,295, got -1"),
    (["--final", "--eval-split", "val"], "--final scores the test split; drop --eval-split val"),
    (["--compile-mode", "max-autotune"], "--compile-mode max-autotune needs --compile"),
    (["--oom-scale-lr"], "--oom-scale-lr needs --oom retry"),
    (["--epochs", "0"], "expected a positive integer, got 0"),
    (["--batch-size", "4096"], "larger than the 1024 training images"),
]


def exit_code(args: list[str]) -> int:
    """main()'s return value, or the code argparse exits with for flags it rejects itself."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_one_line_exit_2_nothing_written(args, message, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert exit_code(["--profile", "smoke", "--device", "cpu", *args, "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_one_line_from_a_real_process(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--profile", "smoke", "--device", "cuda",
                           "--out", str(out_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]
    assert "no CUDA device is available" in proc.stderr and "--device cpu" in proc.stderr
    assert not out_dir.exists()


def test_offline_imagenet_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    code = main(["--profile", "smoke", "--device", "cpu", "--weights", "imagenet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights none" in err and len(err.strip().splitlines()) == 1


def test_the_default_loader_is_dali_where_it_is_installed_else_torch(monkeypatch):
    """`--loader auto`, like `--device auto`: a machine without DALI (the GPU machine until it is staged)
    runs the torch loader instead of stopping, and an explicit `--loader dali` still says what is missing."""
    import importlib.util
    import sys

    from bench.config import parse_config
    installed = importlib.util.find_spec("nvidia.dali") is not None
    assert parse_config(["--profile", "smoke"]).settings.data.loader == ("dali" if installed else "torch")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    assert parse_config(["--profile", "smoke"]).settings.data.loader == "torch"
    assert parse_config(["--profile", "smoke", "--loader", "dali"]).settings.data.loader == "dali"
    assert parse_config(["--profile", "smoke", "--loader", "torchvision"]).settings.data.loader == "torchvision"
