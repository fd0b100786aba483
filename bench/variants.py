"""A run is a list of variants; each is a name, a kind and the settings it overrides.

The sweep trains every variant on a fresh model and never looks at the kind: new kinds (approaches,
epoch budgets) are new generator functions here, not changes to the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.errors import ConfigError
from bench.settings import GROUP_OF, Settings


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    overrides: dict = field(default_factory=dict)

    def apply(self, settings: Settings) -> Settings:
        return settings.replace(**self.overrides)


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


# Seed 001's three ways: head only; the last stage (layer4) and the head; everything from random weights.
APPROACHES = {
    "shallow": {"unit": "block", "unfreeze": 1},
    "deep": {"unit": "stage", "unfreeze": 2},
    "scratch": {"weights": "none", "unfreeze": "all"},
}


def _names(text: str | list, what: str) -> list[str]:
    items = [str(i).strip() for i in (text if isinstance(text, list) else str(text).split(","))]
    if not items or any(not i for i in items) or len(set(items)) != len(items):
        raise ConfigError(f"malformed {what} {text!r}: expected a comma-separated list without repeats")
    return items


def approach_variants(text: str | list) -> list[Variant]:
    names = _names(text, "--approaches")
    unknown = [n for n in names if n not in APPROACHES]
    if unknown:
        raise ConfigError(f"unknown approach {unknown[0]!r}; choose from: {', '.join(APPROACHES)}")
    return [Variant(n, "approach", dict(APPROACHES[n])) for n in names]


def budget_variants(text: str | list) -> list[Variant]:
    budgets = _names(text, "--epoch-budgets")
    if not all(b.isdigit() and int(b) > 0 for b in budgets):
        raise ConfigError(f"malformed --epoch-budgets {text!r}: expected positive integers, e.g. 20,50,100")
    return [Variant(f"epochs-{b}", "epochs", {"epochs": int(b)}) for b in budgets]


def listed_variants(specs: list[dict]) -> list[Variant]:
    """A profile's own `[[variants]]` tables: a `name`, an optional `kind`, and settings to override."""
    variants = []
    for spec in specs:
        spec = dict(spec)
        name, kind = spec.pop("name", None), spec.pop("kind", "named")
        unknown = sorted(set(spec) - GROUP_OF.keys())
        if not name or unknown:
            raise ConfigError(f"profile variant {name!r}: needs a name and known settings only (unknown: {unknown})")
        variants.append(Variant(str(name), kind, spec))
    return variants


def make_variants(settings: Settings, given: frozenset[str] = frozenset()) -> list[Variant]:
    """The run's variants: a profile's list, else approaches, else epoch budgets, else depths.
    `given`: the flags the command line set, which no variant may silently override."""
    sweep, unfreeze = settings.sweep, settings.model.unfreeze
    if sweep.variant_specs:
        variants = listed_variants(sweep.variant_specs)
    elif sweep.approaches:
        variants = approach_variants(sweep.approaches)
    elif sweep.epoch_budgets:
        variants = budget_variants(sweep.epoch_budgets)
    else:
        return depth_variants(unfreeze)
    ignored = sorted(set(given).intersection(*(v.overrides.keys() for v in variants)))
    if ignored:
        flag = "--" + ignored[0].replace("_", "-")
        raise ConfigError(f"{flag} cannot be honoured: every variant of this run ({', '.join(v.name for v in variants)}) "
                          f"sets its own {ignored[0]}")
    # Variants of other kinds train one depth each: their own, or the single one --unfreeze gives.
    if any("unfreeze" not in v.overrides for v in variants):
        depths = parse_unfreeze(unfreeze)
        if len(depths) != 1:
            raise ConfigError(f"these variants train one depth each: give a single --unfreeze, not {unfreeze!r}")
        variants = [v if "unfreeze" in v.overrides else Variant(v.name, v.kind, {"unfreeze": depths[0], **v.overrides})
                    for v in variants]
    if sweep.smoke:
        variants = smoke_budgets(variants, settings.train.max_steps)
    return variants


def smoke_budgets(variants: list[Variant], steps: int) -> list[Variant]:
    """--smoke trains a few steps per variant; variants that differ in their epoch budget keep their
    ratio (20 / 50 / 100 epochs -> 4 / 10 / 20 steps), so their miniature rows still differ."""
    budgets = [v.overrides["epochs"] for v in variants if "epochs" in v.overrides]
    if len(set(budgets)) < 2:
        return variants
    return [Variant(v.name, v.kind, {**v.overrides, "max_steps": max(1, round(steps * v.overrides["epochs"] / min(budgets)))})
            if "epochs" in v.overrides else v for v in variants]
