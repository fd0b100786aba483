"""Helpers shared by the loader tests (test_dali.py, test_loaders.py)."""
import numpy as np
import torch

from pipelines.augment import AUGMENT_SPECS
from pipelines.contract import LoaderSpec

CPU = torch.device("cpu")
MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.4, 0.1)
PAD = AUGMENT_SPECS["flip-crop"].pad


def spec(**kw) -> LoaderSpec:
    """The tests' defaults (evaluation in batches of 32 at 32 px on the CPU, no augmentation), then `kw`."""
    return LoaderSpec(**{**dict(batch_size=32, train=False, image_size=32, mean=MEAN, std=STD, device=CPU), **kw})


def epoch(dl) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in dl]


def levels(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Normalised batch back to grey levels 0..255."""
    return (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255.0


def indexed(n: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Image i is the constant colour (i, 255 - i, i // 2) and its label is i: batches can be decoded."""
    assert n <= 256
    i = np.arange(n)
    colours = np.stack([i, 255 - i, i // 2], axis=1).astype(np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (n, size, size, 3)).copy(), i.astype(np.int64)


def decode(x: torch.Tensor) -> np.ndarray:
    """Channel 0 at the image centre, de-normalised: the image index of an `indexed` batch."""
    return np.rint(levels(x)[:, 0, x.shape[2] // 2, x.shape[3] // 2].numpy()).astype(np.int64)


def match_flip_shift(out: torch.Tensor, ref: torch.Tensor) -> tuple[int, int, int] | None:
    """(flip, dy, dx) such that out is ref shifted by (dy, dx) with zero padding, then maybe mirrored."""
    fill = torch.tensor([(0.0 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    size = ref.shape[-1]
    padded = fill.expand(3, size + 2 * PAD, size + 2 * PAD).clone()
    padded[:, PAD:PAD + size, PAD:PAD + size] = ref
    for flip in (0, 1):
        for dy in range(-PAD, PAD + 1):
            for dx in range(-PAD, PAD + 1):
                crop = padded[:, PAD + dy:PAD + dy + size, PAD + dx:PAD + dx + size]
                if torch.allclose(out, crop.flip(-1) if flip else crop, atol=1e-4):
                    return flip, dy, dx
    return None

