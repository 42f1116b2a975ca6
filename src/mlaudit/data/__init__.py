"""Data: sources, GPU-resident tensor datasets, index-stable views, augmentation, export/import."""

from .base import DataBundle, TensorDataset
from .registry import SOURCES, DatasetSpec, load_dataset, register_source, resolve_dataset_spec

__all__ = ["DataBundle", "TensorDataset", "SOURCES", "DatasetSpec", "load_dataset", "register_source", "resolve_dataset_spec"]
