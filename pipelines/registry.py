"""The loaders `--loader` chooses from, for arrays (CIFAR, synthetic) and for image folders. Each is
imported only when chosen, so a machine without DALI can still run `--loader torch`."""
from __future__ import annotations

import importlib.util

from pipelines.contract import DataError

LOADERS = ("dali", "torch", "torchvision")


def default_loader() -> str:
    """`--loader auto`: DALI where it is installed, else the torch loader (the same tensor ops on the
    device, no extra package), as `--device auto` takes CUDA where there is one. Looked up, not
    imported: importing DALI costs a second and its libraries."""
    try:
        return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"
    except (ImportError, ValueError):  # no `nvidia` namespace at all, or a module left half-imported
        return "torch"


def loader_class(name: str, *, files: bool = False) -> type:
    """The loader class called `name`: `(images, labels, spec: LoaderSpec)`, or with `files`, the
    folder loader `(files, labels, spec)`."""
    if name == "dali":
        try:
            if files:
                from pipelines.dali_folder import DaliFolderLoader as loader
            else:
                from pipelines.dali import DaliLoader as loader
        except ImportError as e:
            raise DataError(f"--loader dali: NVIDIA DALI cannot be imported ({e}); install "
                            f"nvidia-dali-cuda130, or use --loader torch") from None
        return loader
    if name == "torch":
        if files:
            from pipelines.torch_folder import TorchFolderLoader
            return TorchFolderLoader
        from pipelines.torch_loader import TorchLoader
        return TorchLoader
    if name == "torchvision":
        if files:
            from pipelines.torchvision_folder import TorchvisionFolderLoader
            return TorchvisionFolderLoader
        from pipelines.torchvision_loader import TorchvisionLoader
        return TorchvisionLoader
    raise DataError(f"unknown loader {name!r}; choose from: {', '.join(LOADERS)}")
