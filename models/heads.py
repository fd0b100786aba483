"""Classifier heads, keyed by `--head`; each takes (in_features, num_classes)."""
from __future__ import annotations

from torch import nn


def mlp_head(in_features: int, num_classes: int) -> nn.Module:
    """Seed 003: Linear(in, 512) -> ReLU -> Dropout(0.5) -> Linear(512, classes)."""
    return nn.Sequential(nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(512, num_classes))


def deep_head(in_features: int, num_classes: int) -> nn.Module:
    """Seed 004, as published: Dropout(0.5), then Linear in -> 1024 -> 512 -> 256 -> 128 -> classes
    with Dropout(0.2) between. It has no activations, so it is a (heavily regularised) linear map;
    kept that way to reproduce the seed."""
    widths = [in_features, 1024, 512, 256, 128]
    layers: list[nn.Module] = [nn.Dropout(0.5)]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Dropout(0.2)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


HEADS = {
    "linear": lambda in_features, num_classes: nn.Linear(in_features, num_classes),
    "mlp": mlp_head,
    "deep": deep_head,
}
