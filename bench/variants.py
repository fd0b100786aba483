"""A run is a list of variants; each is a name, a kind and the settings it overrides.

The sweep trains every variant on a fresh model and never looks at the kind: new kinds (approaches,
epoch budgets) are new generator functions here, not changes to the loop.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field


class ConfigError(Exception):
    """Bad user input found before any training; the message is one line."""


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    overrides: dict = field(default_factory=dict)

    def apply(self, cfg: argparse.Namespace) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(cfg), **self.overrides})


def parse_unfreeze(text: str | list) -> list[int | str]:
    """'1,3,6,12,15,25' (or a list from a profile) into depths; 'all' means every layer."""
    items = text if isinstance(text, list) else str(text).split(",")
    depths: list[int | str] = []
    for item in items:
        token = str(item).strip().lower()
        if token == "all":
            depths.append("all")
        elif token.isdigit() and int(token) > 0:
            depths.append(int(token))
        else:
            raise ConfigError(f"malformed --unfreeze {text!r}: expected comma-separated positive "
                              f"integers or 'all', e.g. 1,3,6,12,15,25")
    if len(set(depths)) != len(depths):
        raise ConfigError(f"--unfreeze {text!r} lists a depth twice")
    return depths


def depth_variants(text: str | list) -> list[Variant]:
    return [Variant(f"unfreeze-{d}", "depth", {"unfreeze": d}) for d in parse_unfreeze(text)]
