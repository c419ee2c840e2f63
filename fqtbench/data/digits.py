"""scikit-learn's 8x8 handwritten digits: 1797 images with integer pixels 0..16, 10 classes.

Small enough for gradient-free methods and fast tests. The split is fixed (not seed-dependent):
20% test, data.val_fraction of the WHOLE set as validation, the rest training, all stratified.
There is no augmentation for digits: data.augment is ignored (crops/flips destroy 8x8 digits).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from fqtbench.data.base import DatasetSpec, FQTDataModule, assemble, cfg_get, check_common_cfg, stratified_split
from fqtbench.errors import ConfigError

TEST_FRACTION = 0.2
PIXEL_MAX = 16


def build_digits(cfg: Any, seed: int) -> FQTDataModule:
    """Load load_digits into uint8 (N, 1, 8, 8) and split it test/val/train with fixed random states."""
    from sklearn.datasets import load_digits

    check_common_cfg(cfg)
    root = cfg_get(cfg, "root", None)
    if root:  # not an error: one config file may serve a CIFAR track and digits
        warnings.warn(f"data.root={root!r} is not used: the digits data is embedded (scikit-learn)", UserWarning, stacklevel=2)
    size = cfg_get(cfg, "image_size", None)
    if size not in (None, 8):
        raise ConfigError(f"data.image_size={size} is not allowed for digits: the images are 8x8 (use null or 8)")
    vf = float(cfg_get(cfg, "val_fraction", 0.1))
    if vf >= 1.0 - TEST_FRACTION:
        raise ConfigError(f"data.val_fraction={vf} is too large for digits: {TEST_FRACTION:.0%} is already the "
                          f"test split, so it must be below {1.0 - TEST_FRACTION:.1f}")

    bunch = load_digits()
    images = np.rint(bunch.images).clip(0, PIXEL_MAX).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1).contiguous()
    y = torch.from_numpy(bunch.target.astype(np.int64))
    n = len(y)

    rest, test_idx = stratified_split(bunch.target, int(round(TEST_FRACTION * n)), "the digits test split")
    rest_t, test_t = torch.from_numpy(rest), torch.from_numpy(test_idx)
    test = (x[test_t].contiguous(), y[test_t].contiguous())
    return assemble(
        cfg, seed, name="digits", classes=tuple(str(c) for c in bunch.target_names), pixel_max=PIXEL_MAX,
        train=(x[rest_t], y[rest_t]), test=test, n_val=int(round(vf * n)), augment=None,
    )


DIGITS_SPEC = DatasetSpec(
    name="digits",
    version="1",
    description="scikit-learn 8x8 digits (1797 images, pixels 0..16, 10 classes), fixed stratified split: 20% test, val_fraction val",
    build=build_digits,
)
