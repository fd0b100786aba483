"""Where images come from (datasets as uint8 arrays) and how they become batches (DALI, torch and
torchvision loaders behind one contract)."""
from pipelines.augment import AUGMENTS, NORMALIZE
from pipelines.data import (DATASETS, EVAL_SPLITS, DataError, Dataset, Split, load_dataset, num_classes, overlap,
                            select_splits)
from pipelines.loaders import LOADERS, loader_class

__all__ = ["AUGMENTS", "NORMALIZE", "DATASETS", "EVAL_SPLITS", "DataError", "Dataset", "Split", "load_dataset",
           "num_classes", "overlap", "select_splits", "LOADERS", "loader_class"]
