"""`python -m bench.make_folder OUT`: an image folder to try `--dataset folder:PATH` on, offline.

The synthetic classes (`pipelines.synthetic`) enlarged to photograph sizes and saved as JPEG, in the
train/val layout (or one tree with `--layout tree`). The GPU suite's folder step decodes one, and the
README's worked example trains on one; the pixels are smooth, so the decoders' cost per image is that
of a photograph of the same size only roughly (JPEG's entropy coding does less work on smooth blocks).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from bench.args import Parser, int_in
from pipelines.folder import write_folder
from pipelines.synthetic import make_synthetic

ASPECTS = (4 / 3, 3 / 4, 1.0, 3 / 2)  # landscape, portrait, square, wide: the shorter side is --size


def sizes_for(n: int, side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(width, height) per image: the shorter side within 20 % of `side`, one of ASPECTS."""
    shorter = rng.integers(int(side * 0.8), int(side * 1.2) + 1, size=n)
    aspect = rng.choice(ASPECTS, size=n)
    return [(round(s * a), s) if a >= 1 else (s, round(s / a)) for s, a in zip(shorter.tolist(), aspect.tolist())]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m bench.make_folder", description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder to create (must not exist)")
    p.add_argument("--classes", type=int_in(2, 1000), default=10)
    p.add_argument("--per-class", type=int_in(2, 100_000), default=100, help="images per class, train and val together")
    p.add_argument("--val-share", type=float, default=0.2, help="share of every class in val/ (train/val layout)")
    p.add_argument("--size", type=int_in(8, 4096), default=375, help="shorter side in px, within 20 %% (375: ImageNet's typical)")
    p.add_argument("--layout", default="splits", choices=("splits", "tree"))
    p.add_argument("--quality", type=int_in(1, 100), default=90, help="JPEG quality")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if out.exists():
        p.error(f"{out} exists; give a new folder")
    if not 0 < args.val_share < 1:
        p.error(f"--val-share {args.val_share}: expected a number between 0 and 1")
    start = time.perf_counter()
    n = args.classes * args.per_class
    images, labels = make_synthetic(n, args.classes, seed=args.seed, size=32)
    classes = [f"class_{i:03d}" for i in range(args.classes)]
    sizes = sizes_for(n, args.size, np.random.default_rng(args.seed))
    if args.layout == "tree":
        write_folder(out, images, labels, classes, sizes=sizes, quality=args.quality)
    else:
        n_val = max(args.classes, round(n * args.val_share))  # make_synthetic shuffles: every class in both
        for name, part in (("val", slice(0, n_val)), ("train", slice(n_val, n))):
            write_folder(out / name, images[part], labels[part], classes, sizes=sizes[part], quality=args.quality)
    print(f"{out}: {n} JPEG images of {args.classes} classes ({args.layout} layout), shorter side about "
          f"{args.size} px, in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
