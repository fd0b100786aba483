"""From settings to what training consumes: the device, the dataset's splits and their loaders."""
from __future__ import annotations

import torch

from bench.errors import ConfigError
from bench.settings import Settings
from pipelines import NORMALIZE, Dataset, FileSplit, LoaderSpec, Split, load_dataset, loader_class, select_splits


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    return torch.device(name)


def load_splits(s: Settings) -> tuple[Dataset, Split | FileSplit, Split | FileSplit]:
    """The dataset and the (train, evaluation) splits the run uses."""
    d = s.data
    data = load_dataset(d.dataset, data_dir=s.output.data_dir, val_size=d.val_size, seed=s.train.seed,
                        num_classes=d.num_classes, train_size=d.train_size, skip_bad_images=d.skip_bad_images)
    train, evaluation = select_splits(data, d.eval_split, d.final)
    if s.train.batch_size != "auto" and len(train) < s.train.batch_size:
        raise ConfigError(f"--batch-size {s.train.batch_size} is larger than the {len(train)} training images")
    return data, train, evaluation


def make_loader(s: Settings, split: Split | FileSplit, device: torch.device, *, train: bool, shard: tuple[int, int] = (0, 1)):
    """The loader `--loader` names, at the run's settings; `shard`: this rank's part of every epoch
    under --parallel data."""
    mean, std = NORMALIZE[s.data.normalize]
    spec = LoaderSpec(batch_size=s.train.batch_size if train else s.train.eval_batch, train=train,
                      image_size=s.data.image_size, mean=mean, std=std, device=device,
                      augment=s.data.augment if train else "none", fp16=s.speed.precision != "fp32",
                      seed=s.train.seed, num_threads=s.data.workers, rank=shard[0], world_size=shard[1],
                      channels_last=s.speed.channels_last)
    if isinstance(split, FileSplit):
        return loader_class(s.data.loader, files=True)(split.files, split.labels, spec)
    return loader_class(s.data.loader)(split.images, split.labels, spec)
