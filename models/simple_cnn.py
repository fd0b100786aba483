"""Seed 002's small CNN trained from scratch. Its README gives no layer list ("convolutional layers +
poolings"); this is the usual CIFAR reading: three conv-BN-ReLU-pool stages (32, 64, 128 channels),
then a 256-unit hidden layer with dropout. The classifier is `fc`, like a ResNet's, so heads and
freezing by `--unit module` work the same way."""
from __future__ import annotations

import torch
from torch import nn


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        stages = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(4)  # any input size; 4x4 at 32 px, as without it
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.pool(self.features(x))))
