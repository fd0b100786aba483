"""Frozen trunk apart from trainable tail: run the frozen front of a network without autograd.

After `models.apply_unfreeze`, a network is a frozen prefix followed by layers that train. Autograd
already skips weight gradients for the prefix, but the forward still runs inside the training step's
graph context; cutting the prefix off into a `trunk` run under `torch.no_grad()` makes that explicit,
lets the trunk stay in eval mode, and lets `bench.feature_cache` compute its outputs once.

The cut is at a module boundary in forward order (`forward_sequence`). A residual block cannot be
split, so when only part of a block trains, the whole block runs in the tail (its frozen convolutions
get no gradients and save no activations for them, so this stays correct and nearly as cheap).

The trunk always runs in eval mode (frozen BatchNorm on running statistics), so a split model does not
reproduce `--frozen-bn train`; the cut is placed before any dropout, whose train-mode randomness an
eval trunk would silently turn off. The trunk and tail hold the original model's submodules (no
copies): `model.state_dict()` still saves everything, and training the split trains `model`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from models.freeze import frozen_batchnorms
from models.simple_cnn import SimpleCNN

# Modules that behave differently in train mode and have no parameters: they must not run in the
# (always eval) trunk, or the split would differ from the whole model in training.
_TRAIN_MODE_ONLY = (nn.modules.dropout._DropoutNd,)


def _flatten_sequential(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs in forward order; a Sequential runs its children in order, so it is opened."""
    if isinstance(module, nn.Sequential):
        return [pair for child_name, child in module.named_children()
                for pair in _flatten_sequential(f"{name}.{child_name}" if name else child_name, child)]
    return [(name, module)]


def forward_sequence(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as (name, module) pairs whose composition in order is `model.forward`, or None when
    the model is not of a known shape. Only models whose forward is known exactly are listed."""
    if isinstance(model, torchvision.models.ResNet) and type(model).forward is torchvision.models.ResNet.forward \
            and type(model)._forward_impl is torchvision.models.ResNet._forward_impl:
        seq = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            seq += _flatten_sequential(stage, getattr(model, stage))
        # ResNet.forward calls torch.flatten(x, 1) between avgpool and fc; nn.Flatten() is the same op.
        seq += [("avgpool", model.avgpool), ("flatten", nn.Flatten(1))]
        return seq + _flatten_sequential("fc", model.fc)
    if isinstance(model, SimpleCNN) and type(model).forward is SimpleCNN.forward:
        return [*_flatten_sequential("features", model.features), ("pool", model.pool),
                *_flatten_sequential("hidden", model.hidden), *_flatten_sequential("fc", model.fc)]
    if type(model) is nn.Sequential:
        return _flatten_sequential("", model)
    return None


def _must_be_in_tail(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters()) or \
        any(isinstance(m, _TRAIN_MODE_ONLY) for m in module.modules())


def _sequential(pairs: list[tuple[str, nn.Module]]) -> nn.Sequential:
    # Module names cannot contain dots: "layer4.2" becomes "layer4_2".
    return nn.Sequential(OrderedDict((name.replace(".", "_"), m) for name, m in pairs))


class SplitModel(nn.Module):
    """`tail(trunk(x))`, the trunk under `no_grad` and always in eval mode; `cut` names the tail's first module."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, cut: str):
        super().__init__()
        self.trunk, self.tail, self.cut = trunk, tail, cut
        self.trunk.eval()

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad, not inference_mode: inference tensors cannot be saved for the tail's backward and
        # make a compiled graph recompile for tensors created outside the mode.
        with torch.no_grad():
            return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk_features(x))

    def train(self, mode: bool = True) -> SplitModel:
        """Train mode for the tail, except frozen BatchNorm layers (running statistics, as with
        `set_train_mode(..., frozen_bn="eval")`); the trunk stays in eval mode whatever `mode` is."""
        super().train(mode)
        self.trunk.eval()
        for m in frozen_batchnorms(self.tail):
            m.eval()
        return self


def split_frozen(model: nn.Module) -> SplitModel | None:
    """Cut `model` (after `apply_unfreeze`) before the first module that trains (or holds dropout).

    None when nothing can be cut off: the first module already trains, nothing trains at all, or the
    model's shape is not known (see `forward_sequence`)."""
    seq = forward_sequence(model)
    if seq is None:
        return None
    cut = next((i for i, (_, m) in enumerate(seq) if _must_be_in_tail(m)), None)
    if cut is None or cut == 0 or not any(p.requires_grad for p in model.parameters()):
        return None
    return SplitModel(_sequential(seq[:cut]), _sequential(seq[cut:]), seq[cut][0])
