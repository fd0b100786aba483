"""`--weights pretext`: the model pretrained on a synthetic *source* task, so that offline runs measure
transfer, not how much of a random network training can repair.

The source task is the synthetic generator with other classes (`class_seed` 1000; the target sets use
0): what a network learns separating 100 colour layouts carries over to the target's layouts, as
ImageNet features carry over to CIFAR. The weights are trained once per (model, image size, recipe)
with the harness's own loader, optimizer and step, and cached in the data directory beside a JSON
record of the recipe and the file's SHA-256; a stale or corrupt cache is rebuilt with a one-line
warning. Nothing here claims anything about CIFAR or ImageNet accuracy.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from bench.errors import ConfigError
from bench.files import atomic_write
from bench.train import Trainer, make_optimizer, make_scheduler
from models import ModelError, build_model, model_names
from models.build import OWN_MODELS
from pipelines import NORMALIZE, LoaderSpec
from pipelines.synthetic import make_synthetic
from pipelines.torch_loader import TorchLoader

# Measured on the smoke target (resnet18, 32 px, 3 seeds): 100 source classes and 3 epochs of 16,384
# images lift unfreeze-1 from 23 % (random weights) to about 92 %, in under a minute on 2 cores.
RECIPE = {"version": 1, "source_classes": 100, "class_seed": 1000, "images": 16384, "epochs": 3, "batch_size": 128,
          "optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-4, "augment": "flip-crop", "normalize": "cifar",
          "precision": "fp32", "seed": 0}


def cache_path(data_dir: str | Path, model: str, image_size: int) -> Path:
    return Path(data_dir).expanduser() / "pretext" / f"{model}-{image_size}px.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_record(model: str, image_size: int) -> dict:
    return {"model": model, "image_size": image_size, "recipe": RECIPE}


def cached(path: Path, model: str, image_size: int) -> str | None:
    """Why the cache at `path` cannot be used (None: it can): missing, stale or corrupt."""
    record_path = path.with_suffix(".json")
    if not path.exists() and not record_path.exists():
        return "missing"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "corrupt (no readable record beside it)"
    if {k: record.get(k) for k in ("model", "image_size", "recipe")} != expected_record(model, image_size):
        return "stale (built with other settings)"
    if not path.exists() or _sha256(path) != record.get("sha256"):
        return "corrupt (its checksum does not match)"
    return None


def check(model: str, image_size: int) -> None:
    """What cannot have pretext weights, refused before anything is built."""
    if model not in model_names():
        raise ModelError(f"unknown model {model!r}; choose from: {', '.join(model_names())}")
    if model in OWN_MODELS:
        raise ModelError(f"{model} has no pretrained weights; it trains from scratch: use --weights none")
    if image_size % 4:
        raise ConfigError(f"--weights pretext needs an --image-size divisible by 4 (the source images' "
                          f"colour grid), got {image_size}")


def ensure(model: str, image_size: int, data_dir: str | Path,
           on_progress: Callable[[int, int], None] | None = None) -> Path:
    """The cached pretext weights of `model` at `image_size`, built first when missing, stale or corrupt."""
    check(model, image_size)
    path = cache_path(data_dir, model, image_size)
    problem = cached(path, model, image_size)
    if problem is None:
        return path
    if problem != "missing":
        warnings.warn(f"pretext weights {path} are {problem}; rebuilding them")
    start = time.perf_counter()
    state = build(model, image_size, on_progress)
    atomic_write(path, lambda f: torch.save(state, f))
    record = {**expected_record(model, image_size), "sha256": _sha256(path),
              "build_s": round(time.perf_counter() - start, 1), "torch": str(torch.__version__)}
    atomic_write(path.with_suffix(".json"), json.dumps(record, indent=1) + "\n")  # last: the pair is complete
    return path


def build(model: str, image_size: int, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Train `model` from scratch on the source task; its state dict (classifier included, for the
    source's classes: `build_model` loads it strictly and then replaces the head)."""
    r = RECIPE
    torch.manual_seed(r["seed"])
    images, labels = make_synthetic(r["images"], r["source_classes"], seed=r["seed"], size=image_size,
                                    class_seed=r["class_seed"])
    device = torch.device("cpu")
    mean, std = NORMALIZE[r["normalize"]]
    loader = TorchLoader(images, labels, LoaderSpec(batch_size=r["batch_size"], train=True, image_size=image_size,
                                                    mean=mean, std=std, device=device, augment=r["augment"],
                                                    seed=r["seed"]))
    net = build_model(model, r["source_classes"]).to(memory_format=torch.channels_last)
    total = r["epochs"] * len(loader)
    optimizer = make_optimizer(r["optimizer"], net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"],
                               momentum=0.9, device=device)
    trainer = Trainer(net, device=device, precision=r["precision"], compile=False, compile_mode=None,
                      optimizer=optimizer, scheduler=make_scheduler("cosine", optimizer, total_steps=total,
                                                                    steps_per_epoch=len(loader), step_size=1,
                                                                    gamma=1.0))
    net.train()
    for _ in range(r["epochs"]):
        trainer.train_epoch(loader, on_step=None if on_progress is None else
                            lambda step, images: on_progress(trainer.steps_done, total))
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}
