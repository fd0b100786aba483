"""What a run is asked to do: frozen, typed settings grouped by concern, built from the flags and the
profile by `bench.config.parse_config` (the one constructor; tests use it too).

A variant is `settings.replace(**overrides)`. `study()` is everything the figures depend on: what
`--resume` compares with the saved run and what a checkpoint keeps. `OutputSettings` (where files go,
tracing, how ranks share the work) may change between a run and its resumption. What a run learns
while it runs (device, ranks, the chosen batch, the measured ceiling) is `bench.context.RunContext`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from bench.errors import ConfigError


@dataclass(frozen=True)
class DataSettings:
    dataset: str             # a name, or folder:PATH (absolute)
    val_size: int | float    # a count, or a fraction of every class
    train_size: int          # synthetic only
    num_classes: int         # synthetic only
    image_size: int
    augment: str
    normalize: str
    loader: str
    eval_split: str
    final: bool
    allow_overlap: bool
    workers: int
    vary_split: bool         # with repeats: each seed also draws its own validation split
    skip_bad_images: bool    # folders: skip and count unreadable images instead of stopping

    @property
    def scored_split(self) -> str:
        """The split accuracy is reported on: --final trains on train + val and scores test."""
        return "test" if self.final else self.eval_split


@dataclass(frozen=True)
class ModelSettings:
    model: str
    weights: str
    head: str
    unit: str
    unfreeze: int | str | list  # one depth in a variant; the list to sweep in the parsed settings
    frozen_bn: str


@dataclass(frozen=True)
class TrainSettings:
    seed: int
    epochs: int
    steps: int | None        # throughput mode: timed steps after warm-up, no evaluation
    max_steps: int | None
    batch_size: int | str    # "auto" until bench.run has searched
    eval_batch_size: int | None
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    scheduler: str
    step_size: int
    gamma: float
    plateau_patience: int
    early_stop: int
    early_stop_metric: str
    train_acc: bool
    label_smoothing: float
    warmup_steps: int
    oom: str
    oom_scale_lr: bool
    lr_scale_world: str

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True)
class SpeedSettings:
    device: str
    precision: str
    channels_last: bool
    compile: bool
    compile_mode: str | None
    compile_backend: str
    split_trunk: bool
    feature_cache: bool
    breakdown: bool          # a separate, synchronised window per variant timing each phase of the step


@dataclass(frozen=True)
class SweepSettings:
    approaches: str | list | None
    epoch_budgets: str | list | None
    variant_specs: list | None  # a profile's [[variants]] tables
    smoke: bool
    final_best: bool
    seeds: list | None       # repeats: every variant trains once per seed (--seeds, --repeats)


@dataclass(frozen=True)
class OutputSettings:
    profile: str
    out: str | None
    resume: str | None
    data_dir: str
    trace: bool | None       # None: on for CUDA runs
    trace_steps: int
    trace_dir: str | None
    save_checkpoint: bool
    evaluate_best: bool
    parallel: str
    dist_timeout: int
    tolerance: float         # the pick: the cheapest variant within this many top-1 points of the best


GROUPS = {"data": DataSettings, "model": ModelSettings, "train": TrainSettings, "speed": SpeedSettings,
          "sweep": SweepSettings, "output": OutputSettings}
GROUP_OF = {f.name: group for group, kind in GROUPS.items() for f in fields(kind)}
STUDY = frozenset(name for name, group in GROUP_OF.items() if group != "output")


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    speed: SpeedSettings
    sweep: SweepSettings
    output: OutputSettings

    @classmethod
    def from_flat(cls, values: dict) -> Settings:
        """From one flat mapping of every setting's name to its value (extra names are ignored)."""
        missing = sorted(set(GROUP_OF) - values.keys())
        if missing:
            raise ConfigError(f"settings incomplete: missing {', '.join(missing)}")
        return cls(**{group: kind(**{f.name: values[f.name] for f in fields(kind)}) for group, kind in GROUPS.items()})

    def replace(self, **changes) -> Settings:
        unknown = sorted(set(changes) - GROUP_OF.keys())
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        groups: dict[str, dict] = {}
        for name, value in changes.items():
            groups.setdefault(GROUP_OF[name], {})[name] = value
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **c) for g, c in groups.items()})

    @property
    def splits_trunk(self) -> bool:
        """The frozen prefix runs apart under no_grad, which needs its BatchNorm in eval mode."""
        return self.speed.split_trunk and self.model.frozen_bn == "eval"

    def flat(self) -> dict:
        return {f.name: getattr(getattr(self, group), f.name) for group, kind in GROUPS.items() for f in fields(kind)}

    def study(self) -> dict:
        return {k: v for k, v in self.flat().items() if k in STUDY}
