"""`python -m bench.pretext --model resnet18`: build (or check) the `--weights pretext` checkpoint on
purpose, with a progress bar, instead of on the first run that needs it."""
from __future__ import annotations

import sys
import time

from rich.console import Console

from bench.args import Parser, int_in
from bench.config import default_data_dir
from bench.errors import EXIT_OK, EXIT_USAGE, USER_ERRORS
from bench.files import ensure_writable
from bench.report import step_progress
from bench.source_task import RECIPE, cache_path, cached, check, ensure


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m bench.pretext", description="Pretrain a model on the synthetic source task that "
               "--weights pretext uses, and cache it in the data directory.")
    p.add_argument("--model", default="resnet18", help="any torchvision ResNet")
    p.add_argument("--image-size", type=int_in(8, 1024), default=32, help="the target runs' --image-size")
    p.add_argument("--data-dir", default=None, help="where the cache lives (default: bench.run's data directory)")
    p.add_argument("--rebuild", action="store_true", help="build again even when the cache is valid")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    data_dir = args.data_dir or default_data_dir()
    try:
        check(args.model, args.image_size)
        path = cache_path(data_dir, args.model, args.image_size)
        if args.rebuild:
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        state = cached(path, args.model, args.image_size)
        if state is None:
            console.print(f"{path}: valid (recipe {RECIPE}); --rebuild builds it again")
            return EXIT_OK
        ensure_writable(path.parent, "--data-dir")  # before the minute of training, not at its write
        start = time.perf_counter()
        with step_progress(console, f"pretext {args.model} at {args.image_size} px") as update:
            ensure(args.model, args.image_size, data_dir, on_progress=update)
    except USER_ERRORS as e:
        print(f"bench.pretext: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    console.print(f"{path}: built in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
