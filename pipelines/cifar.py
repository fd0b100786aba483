"""CIFAR-10 / CIFAR-100 reader for the original "python version" pickle archives.

The pickles are parsed with numpy instead of through torchvision.datasets.CIFAR10, which builds
PIL-oriented per-image objects the pipelines do not need; torchvision still downloads, extracts and
md5-checks the archive, with the md5s read from its classes so they are never retyped here. A
partially loaded dataset is never returned. The parsed arrays are cached in ``<data_dir>/<name>.npz``
because unpickling 50k images on each run costs more than loading one .npz.

Note: pickle can execute code. Official files are md5-checked before they are unpickled
(``verify=True``); ``verify=False`` is for tests and trusted local copies only.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from pipelines.contract import DataError

__all__ = ["load_cifar"]


@dataclass(frozen=True)
class _Spec:
    title: str
    url: str
    archive: str
    archive_md5: str
    folder: str  # directory the archive extracts to, inside data_dir
    train: tuple[tuple[str, str], ...]  # (filename, md5)
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str]
    label_key: str  # per-batch label key
    names_key: str  # class-name key in the meta file
    n_classes: int

    @property
    def files(self) -> list[tuple[str, str]]:
        return [*self.train, *self.test, self.meta]


def _pairs(entries: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(f), str(m)) for f, m in entries)


_SPECS: dict[str, _Spec] = {
    "cifar10": _Spec(
        title="CIFAR-10",
        url=CIFAR10.url,
        archive=CIFAR10.filename,
        archive_md5=CIFAR10.tgz_md5,
        folder=CIFAR10.base_folder,
        train=_pairs(CIFAR10.train_list),
        test=_pairs(CIFAR10.test_list),
        meta=(CIFAR10.meta["filename"], CIFAR10.meta["md5"]),
        label_key="labels",
        names_key="label_names",
        n_classes=10,
    ),
    "cifar100": _Spec(
        title="CIFAR-100",
        url=CIFAR100.url,
        archive=CIFAR100.filename,
        archive_md5=CIFAR100.tgz_md5,
        folder=CIFAR100.base_folder,
        train=_pairs(CIFAR100.train_list),
        test=_pairs(CIFAR100.test_list),
        meta=(CIFAR100.meta["filename"], CIFAR100.meta["md5"]),
        label_key="fine_labels",
        names_key="fine_label_names",
        n_classes=100,
    ),
}

_PIXELS = 3 * 32 * 32
# Bump when the cache layout changes so stale caches are rebuilt, not misread.
_CACHE_VERSION = 1


def load_cifar(
    name: str,
    data_dir: str | os.PathLike,
    download: bool = True,
    *,
    verify: bool = True,
) -> dict:
    """Returns {"train": (images, labels), "test": (images, labels), "classes": [str, ...]}
    images: numpy uint8 array N x 32 x 32 x 3 (HWC, C-contiguous); labels: numpy int64 array N.
    name is "cifar10" or "cifar100" (CIFAR-100: the 100 fine labels).

    download: fetch and extract the official archive into data_dir when files are missing.
    verify: check every source file against its official md5 before parsing it.
    Raises DataError (one-line message) for missing, corrupt or malformed files."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_SPECS)}")
    root = Path(data_dir).expanduser()
    folder = root / spec.folder
    sources = [folder / f for f, _ in spec.files]

    if any(not p.is_file() for p in sources):
        if not download:
            raise DataError(_missing_message(spec, root, "download disabled"))
        try:
            download_and_extract_archive(
                spec.url, download_root=str(root), filename=spec.archive, md5=spec.archive_md5
            )
        except Exception as e:  # no network, bad archive, disk full: all mean "fetch it yourself"
            raise DataError(_missing_message(spec, root, f"download failed: {_one_line(e)}")) from e
        if any(not p.is_file() for p in sources):
            raise DataError(_missing_message(spec, root, "the downloaded archive lacks them"))

    cache = root / f"{name}.npz"
    cached = _read_cache(cache, spec, sources, need_verified=verify)
    if cached is not None:
        return cached

    if verify:
        for path, md5 in zip(sources, (m for _, m in spec.files)):
            if not check_integrity(str(path), md5):
                raise DataError(
                    f"{path}: checksum mismatch (expected md5 {md5}); the file is corrupt or not the "
                    f"official one: delete {folder} and fetch {spec.url} again"
                )

    result = _parse(spec, folder)
    _write_cache(cache, result, verified=verify)
    return result


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _missing_message(spec: _Spec, root: Path, reason: str) -> str:
    files = ", ".join(f for f, _ in spec.files)
    return (
        f"{spec.title} files missing in {root / spec.folder} (expected {files}; {reason}); "
        f"on a machine with internet access fetch {spec.url} and extract it into {root} "
        f"(it creates {spec.folder}/)"
    )


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # a damaged pickle can raise almost any exception type
        raise DataError(f"{path}: cannot be read as a CIFAR pickle ({_one_line(e)})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(entry: dict[str, Any], key: str, path: Path) -> Any:
    if key not in entry:
        raise DataError(f"{path}: missing key {key!r} (found {sorted(map(str, entry))})")
    return entry[key]


def _labels(raw: Any, n: int, n_classes: int, key: str, path: Path) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.size == 0:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{path}: {key!r} has shape {arr.shape}, expected ({n},) to match the data")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {key!r} has dtype {arr.dtype}, expected integers")
    if n and (arr.min() < 0 or arr.max() >= n_classes):
        raise DataError(
            f"{path}: {key!r} out of range [{arr.min()}, {arr.max()}], expected 0..{n_classes - 1}"
        )
    return arr.astype(np.int64, copy=False)


def _read_batches(spec: _Spec, folder: Path, files: tuple[tuple[str, str], ...]) -> tuple[np.ndarray, np.ndarray]:
    datas, labels = [], []
    for fname, _ in files:
        path = folder / fname
        entry = _load_pickle(path)
        data = np.asarray(_get(entry, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
            raise DataError(
                f"{path}: 'data' is {data.dtype} with shape {data.shape}, expected uint8 N x {_PIXELS}"
            )
        n = data.shape[0]
        datas.append(data)
        labels.append(_labels(_get(entry, spec.label_key, path), n, spec.n_classes, spec.label_key, path))
    flat = np.concatenate(datas) if len(datas) > 1 else datas[0]
    # Rows are three 32x32 channel planes (R, G, B); convert to NHWC, contiguous for the pipelines.
    images = np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


def _names(meta: dict[str, Any], key: str, count: int, path: Path) -> list[str]:
    raw = _get(meta, key, path)
    if not isinstance(raw, (list, tuple)) or len(raw) != count:
        size = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise DataError(f"{path}: {key!r} should list {count} class names, got {size}")
    # Python-2 pickles may yield bytes for strings that were not decoded.
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw]


def _parse(spec: _Spec, folder: Path) -> dict:
    meta_path = folder / spec.meta[0]
    meta = _load_pickle(meta_path)
    classes = _names(meta, spec.names_key, spec.n_classes, meta_path)
    return {"train": _read_batches(spec, folder, spec.train), "test": _read_batches(spec, folder, spec.test),
            "classes": classes}


def _read_cache(cache: Path, spec: _Spec, sources: list[Path], need_verified: bool) -> dict | None:
    """The cached dataset, or None when absent, stale, unverified-but-needed or unreadable."""
    try:
        if cache.stat().st_mtime_ns <= max(p.stat().st_mtime_ns for p in sources):
            return None  # a source pickle changed after the cache was written
        with np.load(cache, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION or (need_verified and not bool(z["verified"])):
                return None
            arrays = {k: z[k] for k in z.files}
        classes = [str(c) for c in arrays["classes"]]
        out: dict[str, Any] = {"classes": classes}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if (x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3)
                    or y.dtype != np.int64 or y.shape != (x.shape[0],)):
                return None
            out[split] = (np.ascontiguousarray(x), y)
        if len(classes) != spec.n_classes:
            return None
        return out
    except Exception:  # missing, truncated or foreign cache: rebuild it from the pickles
        return None


def _write_cache(cache: Path, data: dict, verified: bool) -> None:
    arrays = {
        "version": np.array(_CACHE_VERSION),
        "verified": np.array(verified),
        "classes": np.array(data["classes"], dtype=str),
        "train_x": data["train"][0],
        "train_y": data["train"][1],
        "test_x": data["test"][0],
        "test_y": data["test"][1],
    }
    tmp = None
    try:
        # Same directory as the target so os.replace is an atomic rename: readers never see half a file.
        with tempfile.NamedTemporaryFile(
            dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp", delete=False
        ) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.replace(tmp, cache)
        tmp = None
    except OSError:
        pass  # the cache is only a speed-up; a read-only data_dir must not fail the load
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
