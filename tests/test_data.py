"""Splits, the leakage guard (seed 004's train-as-test mistake) and the data-related bad input."""
import json
import pickle

import numpy as np
import pytest

import pipelines.cifar
from bench.run import main
from pipelines import load_dataset, overlap, select_splits
from pipelines.data import DataError, Split, stratified_split


def test_stratified_split_sizes_balance_and_determinism():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_split(labels, 100, seed=3)
    assert len(train) == 400 and len(val) == 100 and not set(train) & set(val)
    assert np.bincount(labels[val], minlength=10).tolist() == [10] * 10  # every class equally
    assert np.array_equal(val, stratified_split(labels, 100, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 100, seed=4)[1])


@pytest.mark.parametrize("size", [500, 501, 15])
def test_val_size_must_fit_and_divide_by_classes(size):
    with pytest.raises(DataError, match="--val-size"):
        stratified_split(np.repeat(np.arange(10), 50), size, seed=0)


def test_select_splits_val_test_and_final():
    data = load_dataset("synthetic", num_classes=4, train_size=64, val_size=16, seed=0)
    assert select_splits(data, "val", final=False) == (data.train, data.val)
    assert select_splits(data, "test", final=False) == (data.train, data.test)
    train, evaluation = select_splits(data, "val", final=True)
    assert len(train) == 80 and evaluation is data.test
    assert overlap(data.train, data.val) == overlap(data.train, data.test) == 0


def test_overlap_counts_shared_images_exactly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(20, dtype=np.int64)
    train, held_out = Split(images[:15], labels[:15]), Split(images[12:], labels[12:])
    assert overlap(train, held_out) == 3
    nudged = held_out.images.copy()
    nudged[:, 0, 0, 0] ^= 1  # one bit in one pixel: a different image
    assert overlap(train, Split(nudged, held_out.labels)) == 0


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, *, per_batch=20, test_is_train=False):
    """Real-format CIFAR-10 files; `test_is_train` repeats seed 004's mistake (test set = training files)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [j % 10 for j in range(per_batch)]}
        _dump(folder / f"data_batch_{i}", batch)
        batches.append(batch)
    test = batches[0] if test_is_train else {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                                             "labels": [j % 10 for j in range(per_batch)]}
    _dump(folder / "test_batch", test)


RUN = ["--profile", "smoke", "--device", "cpu", "--dataset", "cifar10", "--val-size", "20", "--batch-size", "16", "--epochs", "1",
       "--unfreeze", "1", "--workers", "1", "--weights", "none"]  # each test's own --data-dir: no pretext cache


@pytest.fixture
def unverified(monkeypatch):
    # The generated files are real-format but not the official bytes: skip only the md5 comparison.
    monkeypatch.setattr(pipelines.cifar, "check_integrity", lambda path, md5: True)


def test_seed_004_train_as_test_is_caught(tmp_path, unverified):
    write_cifar10(tmp_path / "data", test_is_train=True)
    out = tmp_path / "run"
    assert main([*RUN, "--data-dir", str(tmp_path / "data"), "--eval-split", "test", "--out", str(out)]) == 1
    result = json.loads((out / "results.json").read_text())
    row = result["rows"][0]
    assert row["status"] == "overlap" and "accuracy withheld" in row["error"]
    assert row["top1"] is None and row["top5"] is None and row["acc_per_gpu_hour"] is None
    assert all("top1" not in h for h in row["history"])
    assert row["images_per_s"] > 0  # speed is still measured and reported
    assert result["run"]["eval_overlap"] > 0


def test_allow_overlap_reports_accuracy_anyway(tmp_path, unverified):
    write_cifar10(tmp_path / "data", test_is_train=True)
    out = tmp_path / "run"
    assert main([*RUN, "--data-dir", str(tmp_path / "data"), "--eval-split", "test", "--allow-overlap",
                 "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["top1"] is not None


def test_clean_cifar_split_reports_accuracy(tmp_path, unverified):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    assert main([*RUN, "--data-dir", str(tmp_path / "data"), "--final", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["rows"][0]["status"] == "ok" and result["run"]["eval_overlap"] == 0
    assert result["run"]["train_images"] == 100 and result["run"]["eval_on"] == "test"  # --final: train + val
    assert result["run"]["classes"][:2] == ["c0", "c1"]
    assert result["rows"][0]["loader_images_per_s"] > 0


def test_offline_cifar_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(pipelines.cifar, "download_and_extract_archive", offline)
    out = tmp_path / "run"
    assert main([*RUN, "--data-dir", str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cifar-10-python.tar.gz" in err and str(tmp_path / "empty") in err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--val-size", "100"], "--val-size 100"),
    (["--val-size", "-5"], "expected an integer in 1..200,000, got -5"),
    (["--augment", "mixup"], "invalid choice: 'mixup'"),
])
def test_data_bad_input_exits_2(tmp_path, capsys, unverified, args, message):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    try:
        code = main([*RUN, "--data-dir", str(tmp_path / "data"), *args, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unwritable_data_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = tmp_path / "run"
    assert main([*RUN, "--data-dir", str(blocker / "cifar"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "writable" in err and len(err.strip().splitlines()) == 1


def test_dali_missing_suggests_torch_loader(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pipelines.dali", None)  # makes `import pipelines.dali` fail
    out = tmp_path / "run"
    assert main(["--profile", "smoke", "--device", "cpu", "--loader", "dali", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "DALI cannot be imported" in err and "--loader torch" in err
    assert not out.exists()


def test_loader_benchmark_gives_a_positive_rate_for_each_loader(capsys):
    import torch

    from bench.config import parse_config
    from bench.loaders import benchmark
    from bench.loaders import main as loaders_main
    s = parse_config(["--image-size", "32", "--batch-size", "32", "--workers", "0",
                      "--precision", "fp32", "--augment", "flip-crop"]).settings
    data = load_dataset("synthetic", num_classes=4, train_size=256, val_size=32, seed=0)
    rows = list(benchmark(s, data.train, torch.device("cpu")))
    assert [r["loader"] for r in rows] == ["torch", "torchvision", "dali"]  # DALI last
    assert all(r["loader_images_per_s"] > 0 and r["loader_batches"] > 0 for r in rows)
    # and the command itself prints the table
    assert loaders_main(["--profile", "smoke", "--device", "cpu", "--train-size", "256", "--val-size", "32", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("dali", "torch", "torchvision")) and "images/s" in out


def test_loader_benchmark_without_dali_measures_the_others_and_writes_json(tmp_path, capsys, monkeypatch):
    import json
    import sys

    from bench.loaders import main as loaders_main
    monkeypatch.setitem(sys.modules, "pipelines.dali", None)  # makes `import pipelines.dali` fail
    path = tmp_path / "loaders.json"
    assert loaders_main(["--profile", "smoke", "--device", "cpu", "--train-size", "512", "--val-size", "32",
                         "--batch-size", "32", "--workers", "0", "--loaders", "dali,torch", "--json", str(path)]) == 0
    rows = {r["loader"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"dali", "torch"}
    assert rows["dali"]["loader_images_per_s"] is None and "DALI cannot be imported" in rows["dali"]["error"]
    assert rows["torch"]["loader_images_per_s"] > 0
    assert "dali: not measured" in capsys.readouterr().out
    assert loaders_main(["--profile", "smoke", "--device", "cpu", "--loaders", "dali,tpu"]) == 2
    assert "--loaders 'dali,tpu'" in capsys.readouterr().err


# DALI's loader kills the process as a native crash would (no exception, no cleanup).
CRASHING_DALI = """
import os, sys
import bench.loaders
real = bench.loaders.make_loader
def make_loader(s, *args, **kwargs):
    if s.data.loader == "dali":
        os._exit(139)
    return real(s, *args, **kwargs)
bench.loaders.make_loader = make_loader
sys.exit(bench.loaders.main(sys.argv[1:]))
"""


def test_a_dali_crash_loses_no_row_of_the_loaders_measured_before_it(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "loaders.json"
    proc = subprocess.run([sys.executable, "-c", CRASHING_DALI, "--profile", "smoke", "--device", "cpu", "--train-size",
                           "256", "--val-size", "32", "--batch-size", "32", "--workers", "0",
                           "--loaders", "dali,torch,torchvision", "--json", str(path)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 139, proc.stderr[-2000:]
    rows = json.loads(path.read_text())["rows"]
    assert [r["loader"] for r in rows] == ["torch", "torchvision"]  # measured first, written as they finished
    assert all(r["loader_images_per_s"] > 0 for r in rows)


def test_loader_benchmark_records_a_loader_that_fails_and_measures_the_next(monkeypatch):
    import torch

    import bench.loaders
    from bench.config import parse_config
    from bench.loaders import benchmark
    real = bench.loaders.make_loader

    def broken_torch_loader(s, *args, **kwargs):
        if s.data.loader == "torch":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(s, *args, **kwargs)
    monkeypatch.setattr(bench.loaders, "make_loader", broken_torch_loader)
    s = parse_config(["--image-size", "32", "--batch-size", "32", "--workers", "0", "--precision", "fp32"]).settings
    data = load_dataset("synthetic", num_classes=4, train_size=256, val_size=32, seed=0)
    torch_row, torchvision_row = benchmark(s, data.train, torch.device("cpu"), ("torch", "torchvision"))
    assert torch_row["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert torch_row["loader_images_per_s"] is None and torchvision_row["loader_images_per_s"] > 0
