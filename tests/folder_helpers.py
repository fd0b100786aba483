"""Small image-folder trees for the folder tests (test_folder.py and the folder loaders' tests): images
from the synthetic set, written as JPEG and PNG at mixed sizes and in mixed modes (RGB, grey, CMYK JPEG,
RGBA and palette PNG), in either layout `pipelines.folder` reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipelines.folder import read_rgb
from pipelines.synthetic import make_synthetic

SIZES = (40, 57, 72, 33)  # shorter sides; every third image is also 1.5x wider
MODES = ("RGB", "L", "CMYK", "RGBA", "P")


def write_images(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], *, start: int = 0,
                 sizes=SIZES, modes=MODES) -> list[Path]:
    """Image i as root/<class>/<start + i>.<jpg|png>: size SIZES[i % 4] (every third 1.5x wider),
    mode MODES[i % 5] (CMYK as JPEG, RGBA and P as PNG, RGB and L alternating JPEG and PNG)."""
    paths = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        side = sizes[i % len(sizes)]
        image = Image.fromarray(pixels).resize((side * 3 // 2 if i % 3 == 0 else side, side), Image.BILINEAR)
        mode = modes[i % len(modes)]
        image = image.convert(mode) if mode != "P" else image.convert("P", palette=Image.ADAPTIVE)
        fmt = "jpg" if mode == "CMYK" or (mode in ("RGB", "L") and i % 2 == 0) else "png"
        path = root / classes[label] / f"{start + i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **({"quality": 92} if fmt == "jpg" else {}))
        paths.append(path)
    return paths


def make_tree(root: Path, *, num_classes: int = 3, per_class: int = 12, layout: str = "tree", seed: int = 0,
              **kw) -> Path:
    """layout "tree": root/<class>/*; "splits": root/train/<class>/* and root/val/<class>/* (a third
    of the images, at least one per class)."""
    root = Path(root)
    classes = [f"c{i}" for i in range(num_classes)]
    images, labels = make_synthetic(num_classes * per_class, num_classes, seed=seed + 1, size=32)
    if layout == "tree":
        write_images(root, images, labels, classes, **kw)
    else:
        n_val = max(num_classes, len(labels) // 3)
        write_images(root / "train", images[n_val:], labels[n_val:], classes, start=n_val, **kw)
        write_images(root / "val", images[:n_val], labels[:n_val], classes, **kw)
    return root


def reference_eval(path, image_size: int, mean, std) -> torch.Tensor:
    """The evaluation transform done directly with torchvision, as its reference scripts do: PIL's RGB
    pixels, shorter side resized to image_size / 0.875 (256 for 224; bilinear, antialiased), centre
    crop, normalised; 3 x S x S float."""
    x = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)
    x = TF.center_crop(TF.resize(x, [int(image_size / 0.875)], antialias=True), [image_size, image_size])
    return v2.Normalize(list(mean), list(std))(x.float() / 255.0)
