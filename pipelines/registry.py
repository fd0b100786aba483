"""The loaders `--loader` chooses from. Each is imported only when chosen, so a machine without DALI
can still run `--loader torch`."""
from __future__ import annotations

from pipelines.contract import DataError

LOADERS = ("dali", "torch", "torchvision")


def loader_class(name: str) -> type:
    """The loader class called `name`; all take `(images, labels, spec: LoaderSpec)`."""
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
