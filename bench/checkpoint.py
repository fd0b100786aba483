"""Checkpoints: a trained variant's weights plus what is needed to rebuild and re-score it
(`python -m bench.evaluate CHECKPOINT` needs nothing else).

A checkpoint is one `torch.save` file holding a plain dict (only dicts, lists, strings, numbers and
CPU tensors), so `torch.load(..., weights_only=True)` reads it without unpickling arbitrary objects.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bench.errors import CheckpointError, first_line
from bench.files import atomic_write
from models import ModelError, build_model

FORMAT = "finetune-bench-checkpoint"
VERSION = 1
# The fields of a result row a checkpoint keeps: which variant it is and how well it scored.
ROW_FIELDS = ("variant", "kind", "unfreeze", "unit", "top1", "top5", "epochs", "steps")


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def _plain(values: Mapping) -> dict:
    """The JSON-able entries of `values`, normalised through JSON (tuples become lists), so every stored
    value is one that `weights_only=True` loading accepts."""
    return {str(k): json.loads(json.dumps(v)) for k, v in values.items() if _jsonable(v)}


def save_checkpoint(path: Path, model: nn.Module, *, settings: dict, row: dict, classes: list[str]) -> None:
    """Written atomically, so a crash mid-write never leaves a truncated file under `path`."""
    path = Path(path)
    bare = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key with _orig_mod.
    if isinstance(bare, nn.parallel.DistributedDataParallel):  # ... and DDP's with module.
        bare = getattr(bare.module, "_orig_mod", bare.module)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in bare.state_dict().items()},
        "settings": _plain(settings),
        "row": _plain({k: row[k] for k in ROW_FIELDS if k in row}),
        "classes": [str(c) for c in classes],
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path) -> dict:
    """The checkpoint dict, checked to be ours and of a version this code reads."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types (truncated zip, pickle junk, unsafe objects)
        raise CheckpointError(f"checkpoint {path}: unreadable (not a torch file, truncated, or holding objects "
                              f"that safe loading refuses: {type(e).__name__}: {first_line(e, 160)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = "a bare state dict" if isinstance(ckpt, dict) and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"checkpoint {path}: not a finetune-bench checkpoint ({what}, no "
                              f"format {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {ckpt.get('version')!r} is not supported "
                              f"(this finetune-bench reads version {VERSION})")
    problems = [key for key, kind in (("state_dict", dict), ("settings", dict), ("row", dict), ("classes", list))
                if not isinstance(ckpt.get(key), kind)]
    if not problems and not isinstance(ckpt["settings"].get("model"), str):
        problems.append("settings.model")
    if problems:
        raise CheckpointError(f"checkpoint {path}: incomplete, missing or malformed {', '.join(problems)}")
    return ckpt


def _stored_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Outputs of the stored classifier: the last 2-D weight of the `fc` head (linear, mlp or deep)."""
    weights = [v for k, v in state.items() if k.startswith("fc.") and k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def build_from_checkpoint(ckpt: dict, num_classes: int | None = None) -> nn.Module:
    """The checkpoint's network with its weights loaded strictly, on the CPU, in eval mode.

    `num_classes`: the class count it must classify (the evaluation dataset's); default the
    checkpoint's own. Anything that does not fit is a one-line CheckpointError, never PyTorch's
    listing of every missing key."""
    settings, state = ckpt["settings"], ckpt["state_dict"]
    name, head = settings.get("model"), settings.get("head", "linear")
    own = len(ckpt["classes"])
    stored = _stored_classes(state)
    n = own if num_classes is None else num_classes
    if n != own or (stored is not None and stored != n):
        raise CheckpointError(f"checkpoint's {name} classifies {stored or own} classes; "
                              f"the evaluation data has {n}")
    try:
        model = build_model(name, n, None, head)
    except ModelError as e:
        raise CheckpointError(f"checkpoint settings cannot be rebuilt: {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                 ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "of another shape")) if keys]
        raise CheckpointError(f"checkpoint weights do not fit {name} with a {head} head for {n} classes "
                              f"(stored classifier: {stored} classes): tensors {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied; keys and shapes were checked above
        raise CheckpointError(f"checkpoint weights do not load into {name}: {first_line(e, 160)}") from None
    return model.eval()
