"""Datasets as in-memory uint8 tensors with fast batched loaders (see base.FQTDataModule for the contract)."""

from fqtbench.data.base import DataInfo, DatasetSpec, FQTDataModule, random_crop_flip
from fqtbench.data.digits import DIGITS_SPEC
from fqtbench.data.images import CIFAR10_SPEC, IMAGEFOLDER_SPEC

__all__ = ["DataInfo", "DatasetSpec", "FQTDataModule", "random_crop_flip",
           "DIGITS_SPEC", "CIFAR10_SPEC", "IMAGEFOLDER_SPEC"]
