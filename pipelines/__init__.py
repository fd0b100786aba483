"""Where images come from (datasets as uint8 arrays, image folders as files) and how they become batches (DALI, torch and
torchvision loaders behind one contract, `pipelines.contract`)."""
from pipelines.augment import AUGMENTS, NORMALIZE
from pipelines.contract import DataError, LoaderSpec, batch_count, epoch_seed
from pipelines.folder import FileSplit, folder_path
from pipelines.data import DATASETS, EVAL_SPLITS, Dataset, Split, load_dataset, num_classes, overlap, select_splits
from pipelines.registry import LOADERS, default_loader, loader_class

__all__ = ["AUGMENTS", "NORMALIZE", "DATASETS", "EVAL_SPLITS", "DataError", "Dataset", "Split", "load_dataset",
           "num_classes", "overlap", "select_splits", "LOADERS", "default_loader", "loader_class", "LoaderSpec", "batch_count",
           "epoch_seed", "FileSplit", "folder_path"]
