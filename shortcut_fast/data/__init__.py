"""Datasets: synthetic frequency-biased images, digits, colored digits/MNIST, corrupted digits/CIFAR-10
(LfF Type0), CIFAR-10, Waterbirds, CelebA, and shortcut injection.

Every loader returns DatasetSplits (train / val / test / extra) of datasets yielding
(image float32 (C,H,W), label, attribute); attribute is the spurious attribute (-1 = unknown)
and group = label * num_attributes + attribute. Start with load_dataset(name, ...) and
list_datasets().
"""
from .adapt import as_splits
from .colored import LFF_COLORS, assign_bias_attributes, colorize
from .core import (DataFormatError, DatasetNotFoundError, DatasetSplits, FileImageDataset, ImageDataset,
                   MissingExtraError, default_data_root, stratified_split)
from .corrupted import make_corrupted_splits
from .loaders import read_idx, read_mnist_5k
from .registry import dataset_options, list_datasets, load_dataset
from .shortcuts import SHORTCUT_KINDS, Shortcut, inject_shortcut, make_shortcut
from .synthetic import make_synthetic_freq

__all__ = [
    "as_splits",
    "ImageDataset",
    "FileImageDataset",
    "DatasetSplits",
    "DatasetNotFoundError",
    "DataFormatError",
    "MissingExtraError",
    "read_mnist_5k",
    "load_dataset",
    "list_datasets",
    "dataset_options",
    "default_data_root",
    "inject_shortcut",
    "make_shortcut",
    "Shortcut",
    "SHORTCUT_KINDS",
    "colorize",
    "assign_bias_attributes",
    "LFF_COLORS",
    "make_corrupted_splits",
    "make_synthetic_freq",
    "read_idx",
    "stratified_split",
]
