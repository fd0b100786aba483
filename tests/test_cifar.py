"""Tests for pipelines.cifar with tiny files written in the real CIFAR pickle format (no network)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipelines import cifar
from pipelines.cifar import load_cifar
from pipelines.contract import DataError

C10_DIR = "cifar-10-batches-py"
C100_DIR = "cifar-100-python"
C10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
C100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
C10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
C100_FILES = ["train", "test", "meta"]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> dict:
    """Writes all official CIFAR-10 files with a few images each; returns what was written."""
    d = root / C10_DIR
    d.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    _dump(d / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = _images(per_batch, seed=i)
        labels = [(i + j) % 10 for j in range(per_batch)]  # list of ints, like the real files
        _dump(d / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        })
        train_data.append(data)
        train_labels += labels
    test_data = _images(n_test, seed=99)
    test_labels = [j % 10 for j in range(n_test)]
    _dump(d / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data,
        "filenames": [f"test_{j}.png" for j in range(n_test)],
    })
    return {"names": names, "train_data": np.concatenate(train_data), "train_labels": train_labels,
            "test_data": test_data, "test_labels": test_labels}


def write_cifar100(root: Path, n_train: int = 10, n_test: int = 5) -> dict:
    """Writes CIFAR-100 train/test/meta with a few images; returns the fine labels and class names written.
    The official files also hold the 20 superclasses' labels and names; they are not read, so not written."""
    d = root / C100_DIR
    d.mkdir(parents=True)
    fine_names = [f"fine{i}" for i in range(100)]
    _dump(d / "meta", {"fine_label_names": fine_names})
    out = {"fine_names": fine_names}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [(7 * j + seed) % 100 for j in range(n)]
        _dump(d / split, {
            "filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": f"{split} batch",
            "fine_labels": fine, "data": _images(n, seed),
        })
        out[split] = fine
    return out


def test_cifar10_shapes_dtypes_labels_and_classes(tmp_path):
    written = write_cifar10(tmp_path)
    ds = load_cifar("cifar10", tmp_path, download=False, verify=False)
    x, y = ds["train"]
    tx, ty = ds["test"]
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and x.flags["C_CONTIGUOUS"]
    assert tx.shape == (6, 32, 32, 3) and tx.dtype == np.uint8 and tx.flags["C_CONTIGUOUS"]
    assert y.dtype == np.int64 and ty.dtype == np.int64
    assert y.tolist() == written["train_labels"] and ty.tolist() == written["test_labels"]
    assert ds["classes"] == written["names"]
    assert set(ds) == {"train", "test", "classes"}
    # Whole-array check of the layout: rows are R, G, B planes of 32x32, row-major.
    expected = written["train_data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(x, expected)


def test_pixel_layout_channel_plane_to_nhwc(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / C10_DIR / "data_batch_2"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.zeros_like(entry["data"])
    n, c, yy, xx = 1, 2, 5, 7  # image 1 of batch 2, blue plane, row 5, column 7
    data[n, c * 1024 + yy * 32 + xx] = 201
    data[n, 0 * 1024 + 3 * 32 + 30] = 17  # red plane, row 3, column 30
    entry["data"] = data
    _dump(path, entry)
    x, _ = load_cifar("cifar10", tmp_path, download=False, verify=False)["train"]
    batch2 = x[4:8]  # 4 images per batch, batch 2 comes second
    assert batch2[n, yy, xx, c] == 201
    assert batch2[n, 3, 30, 0] == 17
    assert int(batch2.sum()) == 201 + 17  # nothing else lit up (no transposed/mixed planes)


def test_cifar100_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    ds = load_cifar("cifar100", tmp_path, download=False, verify=False)
    x, y = ds["train"]
    tx, ty = ds["test"]
    assert x.shape == (10, 32, 32, 3) and tx.shape == (5, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == written["train"]
    assert ty.tolist() == written["test"]
    assert ds["classes"] == written["fine_names"]
    assert set(ds) == {"train", "test", "classes"}


def test_cache_written_and_second_load_equal(tmp_path):
    write_cifar100(tmp_path)
    first = load_cifar("cifar100", tmp_path, download=False, verify=False)
    cache = tmp_path / "cifar100.npz"
    assert cache.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away
    second = load_cifar("cifar100", tmp_path, download=False, verify=False)
    for split in ("train", "test"):
        for a, b in zip(first[split], second[split]):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    assert second["classes"] == first["classes"]
    assert second["train"][0].flags["C_CONTIGUOUS"]


def _age_sources(root: Path, folder: str, seconds: int = 1000) -> None:
    for p in (root / folder).iterdir():
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns - seconds * 10**9, st.st_mtime_ns - seconds * 10**9))


def test_cache_used_only_while_newer_than_pickles(tmp_path):
    write_cifar10(tmp_path)
    first = load_cifar("cifar10", tmp_path, download=False, verify=False)
    _age_sources(tmp_path, C10_DIR)
    # Corrupt a pickle but keep it older than the cache: the cache must be served.
    batch = tmp_path / C10_DIR / "data_batch_3"
    old = batch.stat()
    batch.write_bytes(b"garbage")
    os.utime(batch, ns=(old.st_atime_ns, old.st_mtime_ns))
    cached = load_cifar("cifar10", tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(cached["train"][0], first["train"][0])
    # Now the pickle is newer than the cache: it must be re-parsed (and found corrupt).
    os.utime(batch)
    cache = tmp_path / "cifar10.npz"
    st = cache.stat()
    os.utime(cache, ns=(st.st_atime_ns, batch.stat().st_mtime_ns - 10**9))
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path, download=False, verify=False)


def test_broken_cache_is_rebuilt(tmp_path):
    write_cifar10(tmp_path)
    first = load_cifar("cifar10", tmp_path, download=False, verify=False)
    cache = tmp_path / "cifar10.npz"
    cache.write_bytes(b"PK\x03\x04 not really a zip")  # newer than the pickles, unreadable
    again = load_cifar("cifar10", tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(again["test"][0], first["test"][0])
    with np.load(cache) as z:  # rewritten as a valid cache
        np.testing.assert_array_equal(z["test_x"], first["test"][0])


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError) as ei:
        load_cifar("cifar10", tmp_path, download=False)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(tmp_path) in msg and C10_URL in msg
    assert "data_batch_1" in msg and "extract" in msg
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        load_cifar("cifar100", tmp_path, download=False)


def test_partial_files_never_give_partial_dataset(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / C10_DIR / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar("cifar10", tmp_path, download=False, verify=False)


def test_download_without_network_is_one_line_error(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append((url, kwargs))
        raise OSError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as ei:
        load_cifar("cifar100", tmp_path, download=True)
    msg = str(ei.value)
    assert "\n" not in msg
    assert C100_URL in msg and str(tmp_path) in msg and "download failed" in msg
    assert calls and calls[0][0] == C100_URL
    assert calls[0][1]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_download_extracts_then_loads(tmp_path, monkeypatch):
    def fake_download(url, download_root, **kwargs):
        assert kwargs["md5"] == "c58f30108f718f92721af3b95e74349a"
        write_cifar10(Path(download_root))

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    ds = load_cifar("cifar10", tmp_path, download=True, verify=False)
    assert ds["train"][0].shape == (20, 32, 32, 3)


def test_truncated_pickle_names_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / C10_DIR / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError) as ei:
        load_cifar("cifar10", tmp_path, download=False, verify=False)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    assert not (tmp_path / "cifar10.npz").exists()  # nothing cached from a failed parse


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("data", np.zeros((4, 3000), np.uint8), "shape"),
        ("data", np.zeros((4, 3072), np.float32), "uint8"),
        ("labels", [0, 1, 2], "labels"),
        ("labels", [0, 1, 2, 10], "out of range"),
        ("data", None, "missing key"),
    ],
)
def test_malformed_batch_names_file(tmp_path, field, value, needle):
    write_cifar10(tmp_path)
    path = tmp_path / C10_DIR / "data_batch_4"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    if value is None:
        del entry[field]
    else:
        entry[field] = value
    _dump(path, entry)
    with pytest.raises(DataError) as ei:
        load_cifar("cifar10", tmp_path, download=False, verify=False)
    assert str(path) in str(ei.value) and needle in str(ei.value)


def test_wrong_class_name_count_names_meta(tmp_path):
    write_cifar100(tmp_path)
    path = tmp_path / C100_DIR / "meta"
    _dump(path, {"fine_label_names": ["a"] * 99})
    with pytest.raises(DataError, match="fine_label_names") as ei:
        load_cifar("cifar100", tmp_path, download=False, verify=False)
    assert str(path) in str(ei.value)


def test_checksum_mismatch_with_verify(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError) as ei:
        load_cifar("cifar10", tmp_path, download=False, verify=True)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and "data_batch_1" in msg and "\n" not in msg
    # A cache built without verification must not let verify=True skip the check.
    load_cifar("cifar10", tmp_path, download=False, verify=False)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar("cifar10", tmp_path, download=False, verify=True)


def test_verify_passes_when_md5_matches(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    import hashlib

    folder = tmp_path / C10_DIR
    real = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in C10_FILES}
    spec = cifar._SPECS["cifar10"]
    patched = type(spec)(**{
        **spec.__dict__,
        "train": tuple((f, real[f]) for f, _ in spec.train),
        "test": tuple((f, real[f]) for f, _ in spec.test),
        "meta": (spec.meta[0], real[spec.meta[0]]),
    })
    monkeypatch.setitem(cifar._SPECS, "cifar10", patched)
    assert load_cifar("cifar10", tmp_path, download=False, verify=True)["train"][0].shape[0] == 20
    # Altering one byte of one file is caught.
    path = folder / "test_batch"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum mismatch") as ei:
        load_cifar("cifar10", tmp_path, download=False, verify=True)
    assert str(path) in str(ei.value)


def test_official_md5s_come_from_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    assert dict(cifar._SPECS["cifar10"].files) == {
        **dict(CIFAR10.train_list), **dict(CIFAR10.test_list), CIFAR10.meta["filename"]: CIFAR10.meta["md5"]}
    assert dict(cifar._SPECS["cifar100"].files) == {
        **dict(CIFAR100.train_list), **dict(CIFAR100.test_list), CIFAR100.meta["filename"]: CIFAR100.meta["md5"]}


def test_unknown_name_rejected(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar("mnist", tmp_path, download=False)
