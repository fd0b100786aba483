"""What each `--augment` and `--normalize` choice means, shared by every loader (DALI, torch, torchvision)
so that the same settings give statistically the same images whichever loader makes them.

All random choices are per sample. Geometry and colour are applied at the native 32 px, before the
resize to `--image-size`: the same result as augmenting after the resize (up to interpolation), at a
fraction of the cost.
"""
from __future__ import annotations

from dataclasses import dataclass

AUGMENTS = ("none", "flip", "flip-crop", "heavy")

# Seed 000 normalised with the CIFAR-10 training statistics; ImageNet weights were trained with these.
NORMALIZE = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Augment:
    flip: bool = False          # horizontal flip with probability 1/2
    pad: int = 0                # random crop of the original size from the image zero-padded by `pad` px
    brightness: float = 0.0     # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0       # factor drawn from [1 - c, 1 + c], around the image's mean grey
    saturation: float = 0.0     # factor drawn from [1 - s, 1 + s]
    hue: float = 0.0            # shift drawn from [-h, h], in turns of the colour wheel (0.5 = 180 degrees)
    rotate: float = 0.0         # angle drawn from [-r, r] degrees, zero fill, same size
    grayscale: float = 0.0      # probability of converting to grey (kept as 3 channels)

    @property
    def colour_or_rotation(self) -> bool:
        """Whether any colour, grey or rotation draw is asked for (beyond flip and crop)."""
        return bool(self.brightness or self.contrast or self.saturation or self.hue or self.rotate or self.grayscale)


AUGMENT_SPECS = {
    "none": Augment(),
    # seeds 002 and 004
    "flip": Augment(flip=True),
    # CIFAR's standard: torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip
    "flip-crop": Augment(flip=True, pad=4),
    # seed 003
    "heavy": Augment(flip=True, pad=4, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05,
                     rotate=15.0, grayscale=0.1),
}


def augment_spec(name: str) -> Augment:
    if name not in AUGMENT_SPECS:
        raise ValueError(f"unknown augment {name!r}; choose from: {', '.join(AUGMENTS)}")
    return AUGMENT_SPECS[name]
