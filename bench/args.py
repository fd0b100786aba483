"""argparse with one-line errors, and the value types the commands share. Free of heavy imports, so
a command that only parses (the suite's parent process) starts fast."""
from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr and exit 2 (argparse's default also prints the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_in(low: int, high: int):
    """An argparse type for integers in [low, high]: sizes past `high` would exhaust memory before
    they could fail more usefully (a 10-million-image synthetic set is 30 GB)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high:,}, got {value:,}")
        return value
    return parse


def count_or_fraction(text: str) -> int | float:
    """A number of images (an integer, 1..200,000) or a share of them (a number strictly between 0 and 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if 0 < value < 1:
        return value
    return int_in(1, 200_000)(text)


def batch_size_arg(text: str) -> int | str:
    """A batch size, or `auto` (bench.batch_size finds the fastest that fits)."""
    return "auto" if text == "auto" else int_in(1, 65536)(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, e.g. 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected distinct seeds in 0..{2**32 - 1}, got {text!r}")
    return seeds
