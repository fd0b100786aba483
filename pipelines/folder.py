"""Image folders: `--dataset folder:PATH`, read the way torchvision's `ImageFolder` reads them.

Layouts: `PATH/train/<class>/*` with `PATH/val/<class>/*` (and optionally `PATH/test/<class>/*`), or a
single `PATH/<class>/*` tree split into train and val by the seeded, stratified `--val-size`. Class
names are the folder names in `find_classes`'s sorted order; files are walked in `ImageFolder`'s order
(sorted walk, links followed); files whose extension is not an image's are ignored and counted.

Every image is decoded once when the folder is loaded (PIL, `convert("RGB")`: `ImageFolder`'s loader,
so grey, CMYK and alpha images become RGB the way torchvision makes them). That pass finds corrupt
and truncated files before anything is trained, and hashes the decoded pixels for the leakage guard: a
copy of a training image is caught whatever its name, metadata or lossless container (a PNG resaved
from a JPEG's pixels). What a hash cannot catch: a lossy re-encoding, a resize or a crop of the same
photograph. The digests are kept in `<data-dir>/folders/` keyed by path, size and mtime, so a second run
decodes only what changed.

Transforms (every loader, `pipelines.augment`'s names): evaluation, and training with `--augment none`,
resize the shorter side to `eval_resize(image_size)` (image_size / 0.875, as torchvision's and timm's
references) and centre-crop; `flip` adds the flip to that view; `flip-crop` and `heavy` replace CIFAR's
pad-crop with the random-resized crop (scale 0.08-1, aspect 3/4-4/3) to `image_size`, then flip, and
`heavy` adds its colour, rotation and grey draws at the output size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import find_classes, pil_loader

from pipelines.augment import Augment, augment_spec
from pipelines.contract import DataError

PREFIX = "folder:"
EXTENSIONS = (".jpg", ".jpeg", ".png")  # what all three loaders' decoders read: DALI, torchvision.io and PIL
LAYOUT_SPLITS = ("train", "val", "test")
EVAL_CROP = 0.875          # the centre crop's share of the resized shorter side
RRC_SCALE = (0.08, 1.0)    # random-resized crop: share of the image's area ...
RRC_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio, torchvision's defaults
CACHE_VERSION = 1


def folder_path(dataset: str) -> Path | None:
    """PATH of a `folder:PATH` dataset name, else None."""
    return Path(dataset[len(PREFIX):]) if dataset.startswith(PREFIX) else None


def eval_resize(image_size: int) -> int:
    """The shorter side before the centre crop: 256 for 224."""
    return int(image_size / EVAL_CROP)


@dataclass(frozen=True)
class NaturalAugment:
    """What a loader does to a natural image: `random_crop` (the random-resized crop, else the
    evaluation view) and `extras` (flip, colour, rotation, grey at the output size; `pad` unused)."""
    random_crop: bool
    extras: Augment


def natural_augment(name: str, train: bool) -> NaturalAugment:
    aug = augment_spec(name)  # unknown names fail even for evaluation
    if not train:
        return NaturalAugment(False, Augment())
    return NaturalAugment(aug.pad > 0, dataclasses.replace(aug, pad=0))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """H x W x 3 uint8, as `ImageFolder`'s default loader decodes it."""
    return np.array(pil_loader(path))


@dataclass(frozen=True)
class FileSplit:
    files: np.ndarray    # N paths (str)
    labels: np.ndarray   # N, int64
    digests: np.ndarray  # N x 16 bytes: blake2b of the decoded pixels and their shape

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "FileSplit") -> "FileSplit":
        return FileSplit(*(np.concatenate([a, b]) for a, b in
                           ((self.files, other.files), (self.labels, other.labels), (self.digests, other.digests))))

    def subset(self, index: np.ndarray) -> "FileSplit":
        return FileSplit(self.files[index], self.labels[index], self.digests[index])

    def picture(self, i: int) -> np.ndarray:
        return read_rgb(self.files[i])


@dataclass
class FolderInfo:
    """What the run info records about the folder."""
    path: str
    layout: str                    # "splits" (train/val[/test]) or "tree" (one tree split by --val-size)
    images: dict[str, int] = field(default_factory=dict)  # per folder split
    ignored_files: int = 0         # not an image by extension
    skipped_images: list[str] = field(default_factory=list)  # unreadable, with --skip-bad-images


def pixel_digest(pixels: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.digest()


def classes_of(root: Path) -> list[str]:
    """The class names of a folder dataset, without reading any image (plans need only the count)."""
    root = _checked_root(root)
    return _classes(_layout(root)[1][0][1])


def _checked_root(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--dataset folder:{root}: {'not a directory' if root.exists() else 'no such directory'}")
    return root


def _layout(root: Path) -> tuple[str, list[tuple[str, Path]]]:
    """("splits", [(name, dir), ...]) when PATH has train/ and val/, else ("tree", [("train", PATH)])."""
    present = [name for name in LAYOUT_SPLITS if (root / name).is_dir()]
    if "train" in present or "val" in present:
        if not {"train", "val"} <= set(present):
            missing = "val" if "train" in present else "train"
            raise DataError(f"--dataset folder:{root}: has {present[0]}/ but no {missing}/; give train/ and val/ "
                            f"(and optionally test/), or one tree of class folders")
        return "splits", [(name, root / name) for name in present]
    return "tree", [("train", root)]


def _classes(directory: Path) -> list[str]:
    try:
        classes, _ = find_classes(str(directory))
    except FileNotFoundError:
        raise DataError(f"--dataset folder:{directory}: no class folders (expected {directory}/<class>/<image>)") from None
    if len(classes) < 2:
        raise DataError(f"--dataset folder:{directory}: one class folder ({classes[0]}); a classifier needs two or more")
    return classes


def _walk(directory: Path, classes: list[str]) -> tuple[list[str], list[int], int]:
    """Image files and labels in ImageFolder's order, and how many other files were passed over."""
    files, labels, ignored = [], [], 0
    for label, name in enumerate(classes):
        found = 0
        for root, _, names in sorted(os.walk(directory / name, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(EXTENSIONS):
                    files.append(os.path.join(root, fname))
                    labels.append(label)
                    found += 1
                else:
                    ignored += 1
        if not found:
            raise DataError(f"--dataset folder: class folder {directory / name} has no images "
                            f"({', '.join(EXTENSIONS)})")
    return files, labels, ignored


class DigestCache:
    """Decoded-pixel digests of a folder's files, on disk, keyed by (relative path, size, mtime)."""

    def __init__(self, root: Path, data_dir: str | os.PathLike | None):
        key = hashlib.blake2b(str(root.resolve()).encode(), digest_size=8).hexdigest()
        self.path = Path(data_dir).expanduser() / "folders" / f"{key}.json" if data_dir is not None else None
        self.entries: dict[str, list] = {}
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                if saved.get("version") == CACHE_VERSION and saved.get("root") == str(root.resolve()):
                    self.entries = saved["files"]
            except (OSError, ValueError, KeyError, AttributeError):
                warnings.warn(f"{self.path}: unreadable folder cache; every image is decoded again")
        self.root, self.changed = root.resolve(), False

    def lookup(self, file: str) -> tuple[bytes | None, str | None] | None:
        """(digest, None), (None, error), or None when the file is new or has changed."""
        stat = os.stat(file)
        entry = self.entries.get(os.path.relpath(file, self.root))
        if entry is None or entry[:2] != [stat.st_size, stat.st_mtime_ns]:
            return None
        return (bytes.fromhex(entry[2]), None) if entry[2] else (None, entry[3])

    def store(self, file: str, digest: bytes | None, error: str | None) -> None:
        stat = os.stat(file)
        self.entries[os.path.relpath(file, self.root)] = [stat.st_size, stat.st_mtime_ns,
                                                          digest.hex() if digest else "", error]
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "root": str(self.root), "files": self.entries}))
            os.replace(tmp, self.path)
        except OSError as e:  # a cache that cannot be written costs time, not correctness
            warnings.warn(f"{self.path}: folder cache not written ({e.strerror})")


def _decode_digest(file: str) -> tuple[bytes | None, str | None]:
    try:
        return pixel_digest(read_rgb(file)), None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def _digests(files: Sequence[str], cache: DigestCache, threads: int) -> list[tuple[bytes | None, str | None]]:
    results = [cache.lookup(f) for f in files]
    todo = [i for i, r in enumerate(results) if r is None]
    # PIL releases the GIL while it decodes: threads use every core without pickling images
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, result in zip(todo, pool.map(_decode_digest, [files[i] for i in todo])):
            results[i] = result
            cache.store(files[i], *result)
    cache.save()
    return results


def load_folder(root: str | os.PathLike, *, skip_bad_images: bool = False,
                data_dir: str | os.PathLike | None = None,
                threads: int | None = None) -> tuple[dict[str, FileSplit], list[str], FolderInfo]:
    """({split name: FileSplit}, classes, info): "train", "val" and maybe "test" for the splits
    layout, only "train" (the whole tree, for the caller to split) for the tree layout. Raises
    DataError, naming the file or folder, for everything the module docstring says is wrong."""
    root = _checked_root(Path(root))
    layout, dirs = _layout(root)
    classes = _classes(dirs[0][1])
    info = FolderInfo(str(root.resolve()), layout)
    cache = DigestCache(root, data_dir)
    splits: dict[str, FileSplit] = {}
    for name, directory in dirs:
        if name != "train":
            other = _classes(directory)
            if other != classes:
                only_train, only_here = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
                raise DataError(f"--dataset folder:{root}: {name}/ and train/ have different classes "
                                f"(only in train/: {', '.join(only_train) or '-'}; only in {name}/: "
                                f"{', '.join(only_here) or '-'})")
        files, labels, ignored = _walk(directory, classes)
        info.ignored_files += ignored
        digests = _digests(files, cache, threads or os.cpu_count() or 1)
        bad = [(f, err) for f, (_, err) in zip(files, digests) if err is not None]
        if bad and not skip_bad_images:
            file, err = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{file}: not a readable image ({err}){more}; --skip-bad-images skips and counts them")
        keep = [i for i, (d, _) in enumerate(digests) if d is not None]
        info.skipped_images += [f for f, _ in bad]
        split = FileSplit(np.array([files[i] for i in keep], dtype=object), np.array(labels, dtype=np.int64)[keep],
                          np.array([digests[i][0] for i in keep], dtype="S16"))
        missing = sorted(set(range(len(classes))) - set(split.labels.tolist()))
        if missing:
            raise DataError(f"--dataset folder: class folder {directory / classes[missing[0]]} has no readable images")
        info.images[name] = len(split)
        splits[name] = split
    return splits, classes, info


def write_folder(root: str | os.PathLike, images: np.ndarray, labels: np.ndarray, classes: list[str], *,
                 sizes: Sequence[tuple[int, int]] | None = None, fmt: str = "jpg", quality: int = 90,
                 threads: int | None = None) -> list[Path]:
    """Write uint8 images as `root/<class>/<index>.<fmt>` (an ImageFolder tree), image i resized
    (bilinear) to sizes[i] = (width, height) when given. Returns the paths."""
    root = Path(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)

    def write(i: int) -> Path:
        image = Image.fromarray(images[i])
        if sizes is not None:
            image = image.resize(sizes[i], Image.BILINEAR)
        path = root / classes[labels[i]] / f"{i:06d}.{fmt}"
        image.save(path, **({"quality": quality} if fmt in ("jpg", "jpeg") else {}))
        return path

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:  # PIL encodes without the GIL
        return list(pool.map(write, range(len(labels))))
