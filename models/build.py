"""Build a torchvision ResNet whose classifier is replaced for the dataset's classes.

Pretrained weights are loaded once per run (`load_pretrained`) and copied into a fresh network for
every variant (`build_model`), so a six-depth sweep reads or downloads them once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn

from models.heads import HEADS
from models.simple_cnn import SimpleCNN


class ModelError(Exception):
    """A model, weights or head the user asked for cannot be provided; the message is one line."""


# Models defined here rather than in torchvision; none has pretrained weights.
OWN_MODELS: dict[str, Callable[[int], nn.Module]] = {"simple_cnn": SimpleCNN}


def model_names() -> list[str]:
    """Every torchvision ResNet-family classifier (resnet*, resnext*, wide_resnet*), and simple_cnn."""
    return sorted([
        *(n for n in torchvision.models.list_models(module=torchvision.models)
          if n.startswith(("resnet", "resnext", "wide_resnet"))),
        *OWN_MODELS,
    ])


def _check_name(name: str) -> None:
    if name not in model_names():
        raise ModelError(f"unknown model {name!r}; choose from: {', '.join(model_names())}")


def load_pretrained(name: str, weights: str) -> Mapping[str, torch.Tensor] | None:
    """`weights` is `imagenet` (torchvision's DEFAULT weight enum), `none`, or a path to a state dict."""
    _check_name(name)
    if weights == "none":
        return None
    if name in OWN_MODELS:
        raise ModelError(f"{name} has no pretrained weights; it trains from scratch: use --weights none")
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            # torch.hub caches the file under $TORCH_HOME, so only the first run needs the network.
            return enum.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
            raise ModelError(
                f"cannot load ImageNet weights {name}.{enum.name} ({type(e).__name__}: {e}); "
                f"run with --weights none, or --weights PATH to a saved state dict"
            ) from None
    if not os.path.isfile(weights):
        raise ModelError(f"--weights {weights!r}: expected imagenet, none or the path of a state-dict file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file; all mean the same to the user
        raise ModelError(f"cannot read state dict {weights}: {type(e).__name__}: {e}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict", state.get("model")), Mapping):
        state = state.get("state_dict", state.get("model"))  # common checkpoint wrappers
    if not isinstance(state, Mapping) or "fc.weight" not in state:
        raise ModelError(f"{weights} is not a state dict of a torchvision ResNet (no 'fc.weight')")
    return state


def build_model(name: str, num_classes: int, state: Mapping[str, torch.Tensor] | None = None,
                head: str = "linear") -> nn.Module:
    """A fresh network: `state` loaded into the backbone, then `fc` replaced by `head` for `num_classes`."""
    _check_name(name)
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose from: {', '.join(HEADS)}")
    # Build with the classifier shape of the saved weights so that loading stays strict.
    out = state["fc.weight"].shape[0] if state is not None else 1000
    model = OWN_MODELS[name](out) if name in OWN_MODELS else \
        torchvision.models.get_model(name, weights=None, num_classes=out)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1] if "\n" in str(e) else str(e)
            raise ModelError(f"weights do not fit {name}: {first.strip()}") from None
    model.fc = HEADS[head](model.fc.in_features, num_classes)
    return model
