"""scikit-learn's 8x8 digits, scaled to [-1, 1] and split reproducibly.

The data set ships inside scikit-learn (1,797 real handwritten digits, pixel
values 0..16), so the demo needs no download.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_SEED", "TEST_FRACTION", "DigitsSplit", "load_digits_split", "to_pixels", "from_pixels"]

#: Seed and held-out fraction of the split used by training, tests and the classifier.
DEFAULT_SEED = 0
TEST_FRACTION = 0.2

#: sklearn digits are integers in 0..16.
_PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """A train/test split; images are float32 ``[N, 1, 8, 8]`` in ``[-1, 1]``, labels int64 ``[N]``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    seed: int
    test_fraction: float

    def describe(self) -> dict[str, object]:
        """JSON-friendly summary for manifests."""
        return {
            "name": "sklearn.datasets.load_digits",
            "num_images": len(self.train_labels) + len(self.test_labels),
            "num_train": len(self.train_labels),
            "num_test": len(self.test_labels),
            "split": "sklearn.model_selection.train_test_split(stratify=labels)",
            "split_seed": self.seed,
            "test_fraction": self.test_fraction,
            "scaling": "pixels / 8 - 1 (0..16 -> [-1, 1])",
        }


def from_pixels(pixels: np.ndarray | Tensor) -> Tensor:
    """Raw 0..16 pixels (any shape with 64 values per image) -> ``[N, 1, 8, 8]`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return (x / (_PIXEL_MAX / 2) - 1.0).reshape(-1, 1, 8, 8)


def to_pixels(images: Tensor) -> np.ndarray:
    """``[N, 1, 8, 8]`` images in ``[-1, 1]`` -> ``[N, 64]`` float64 0..16 (clipped), sklearn's layout."""
    x = images.detach().to("cpu", torch.float64).reshape(len(images), 64).clamp(-1.0, 1.0)
    return ((x + 1.0) * (_PIXEL_MAX / 2)).numpy()


@functools.lru_cache(maxsize=4)
def load_digits_split(seed: int = DEFAULT_SEED, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """Load the digits and split them (stratified, seeded). Cached: the result is immutable by convention."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)),
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,  # keep all 10 classes balanced in both halves
    )
    images = from_pixels(digits.data)  # [1797, 1, 8, 8]
    labels = torch.as_tensor(digits.target, dtype=torch.int64)  # [1797]
    return DigitsSplit(
        train_images=images[idx_train],
        train_labels=labels[idx_train],
        test_images=images[idx_test],
        test_labels=labels[idx_test],
        seed=seed,
        test_fraction=test_fraction,
    )
