"""Freezing by depth: number a network's layers from the output end and train only the last N.

With `--unit module` a residual block's projection shortcut (`downsample`: conv + BN) counts as one
layer: only that reading reproduces seed 000's published counts on resnet50 (as two, depths 15 and 25
would train 23 and 38 parameter tensors instead of 25 and 40).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from models.build import ModelError

UNITS = ("module", "block", "stage")
_PARAMETERISED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[nn.Module, ...]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


@dataclass
class FreezePlan:
    """What one depth trains. `frozen_bn` are the BatchNorm layers kept in eval mode while training."""
    depth: int
    unit: str
    num_layers: int
    trainable_layers: list[str]
    trainable_tensors: int
    trainable_params: int
    total_params: int
    frozen_bn: list[nn.BatchNorm2d] = field(repr=False, default_factory=list)


def _module_layers(model: nn.Module) -> list[Layer]:
    found: list[Layer] = []
    shortcut_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in shortcut_prefixes):
            continue  # inside a shortcut already counted as one layer
        if name.endswith("downsample") and isinstance(module, nn.Sequential):
            found.append(Layer(name, (module,)))
            shortcut_prefixes.append(name + ".")
        elif isinstance(module, _PARAMETERISED):
            found.append(Layer(name, (module,)))
    return found


def _resnet_parts(model: nn.Module, unit: str) -> list[Layer]:
    if not all(hasattr(model, n) for n in ("conv1", "bn1", "fc", *_STAGES)):
        raise ModelError(f"--unit {unit} needs a ResNet (stem, layer1..layer4, fc); use --unit module")
    parts = [Layer("stem", (model.conv1, model.bn1))]
    for stage in _STAGES:
        blocks = getattr(model, stage)
        if unit == "stage":
            parts.append(Layer(stage, (blocks,)))
        else:
            parts.extend(Layer(f"{stage}.{i}", (b,)) for i, b in enumerate(blocks))
    parts.append(Layer("fc", (model.fc,)))
    return parts


def layers(model: nn.Module, unit: str) -> list[Layer]:
    """The model's layers for `unit`, numbered from the output end: `layers(...)[0]` is the head."""
    if unit not in UNITS:
        raise ModelError(f"unknown unit {unit!r}; choose from: {', '.join(UNITS)}")
    ordered = _module_layers(model) if unit == "module" else _resnet_parts(model, unit)
    return ordered[::-1]


def resolve_depth(depth: int | str, num_layers: int, model_name: str, unit: str) -> int:
    if depth == "all":
        return num_layers
    if not 1 <= depth <= num_layers:
        raise ModelError(f"--unfreeze {depth}: {model_name} has {num_layers} layers with --unit {unit} "
                         f"(use 1..{num_layers} or all)")
    return depth


def apply_unfreeze(model: nn.Module, depth: int | str, unit: str, model_name: str = "model") -> FreezePlan:
    """Freeze everything, then make the last `depth` layers trainable (`all`: every layer)."""
    ordered = layers(model, unit)
    n = resolve_depth(depth, len(ordered), model_name, unit)
    model.requires_grad_(False)
    for layer in ordered[:n]:
        for m in layer.modules:
            m.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_bn = frozen_batchnorms(model)
    return FreezePlan(
        depth=n, unit=unit, num_layers=len(ordered),
        trainable_layers=[layer.name for layer in ordered[:n]],
        trainable_tensors=len(trainable),
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        frozen_bn=frozen_bn,
    )


def frozen_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers with nothing to train: in eval mode while training, so their running
    statistics stay the pretrained ones."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())]


def set_train_mode(model: nn.Module, plan: FreezePlan, frozen_bn: str = "eval") -> None:
    """Training mode, except frozen BatchNorm layers stay in eval mode so their running statistics
    do not drift (`frozen_bn="train"` reproduces seed 000, which let them drift)."""
    model.train()
    if frozen_bn == "eval":
        for bn in plan.frozen_bn:
            bn.eval()
