"""Where images come from (datasets as uint8 arrays) and how they become batches (DALI pipelines)."""
from pipelines.data import DATASETS, DataError, Dataset, Split, load_dataset

__all__ = ["DATASETS", "DataError", "Dataset", "Split", "load_dataset"]
