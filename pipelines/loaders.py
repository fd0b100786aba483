"""The three loaders behind one batch contract, chosen by `--loader`, imported only when chosen so a
machine without DALI can still run `--loader torch`.

Contract: `Loader(images, labels, *, batch_size, train, image_size, mean, std, device, augment, half,
seed, num_threads)`; `len()` batches per epoch (training drops the last partial batch); each `for`
loop is one epoch of (images NCHW channels_last float on `device`, labels int64 on `device`).
"""
from __future__ import annotations

from pipelines.cifar import DataError

LOADERS = ("dali", "torch", "torchvision")


def loader_class(name: str) -> type:
    if name == "dali":
        try:
            from pipelines.dali import DaliLoader
        except ImportError as e:
            raise DataError(f"--loader dali: NVIDIA DALI cannot be imported ({e}); install "
                            f"nvidia-dali-cuda130, or use --loader torch") from None
        return DaliLoader
    if name == "torch":
        from pipelines.torch_loader import TorchLoader
        return TorchLoader
    if name == "torchvision":
        from pipelines.torchvision_loader import TorchvisionLoader
        return TorchvisionLoader
    raise DataError(f"unknown loader {name!r}; choose from: {', '.join(LOADERS)}")
