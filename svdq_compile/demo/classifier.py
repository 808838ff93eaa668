"""A digit classifier used as the quality metric for generated samples.

An RBF SVC on the 64 raw pixels, fitted on the *real* train split at call time
(< 1 s) and cached in-process. "Accuracy of the classifier on samples generated
for label y" is then a cheap, label-aware proxy for sample quality: it drops
when a (quantized) model produces blurry, off-class or broken digits.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from svdq_compile.demo.data import DEFAULT_SEED, load_digits_split, to_pixels

if TYPE_CHECKING:
    from sklearn.svm import SVC

__all__ = ["accuracy", "get_classifier", "predict", "heldout_accuracy"]


@functools.lru_cache(maxsize=4)
def get_classifier(seed: int = DEFAULT_SEED) -> SVC:
    """Fit (once per process and split seed) an SVC on the real train split."""
    from sklearn.svm import SVC  # lazy: sklearn import is slow-ish

    split = load_digits_split(seed)
    clf = SVC(C=10.0, gamma="scale")  # C=10: slightly less regularised than default; ~99% held-out
    clf.fit(to_pixels(split.train_images), split.train_labels.numpy())
    return clf


def predict(images: Tensor) -> Tensor:
    """Classify ``[B, 1, 8, 8]`` images in ``[-1, 1]`` (values outside are clipped) -> ``[B]`` int64."""
    pred = get_classifier().predict(to_pixels(images))
    return torch.as_tensor(np.asarray(pred), dtype=torch.int64)


def accuracy(images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` ``[B, 1, 8, 8]`` that the classifier assigns to ``labels`` ``[B]``."""
    pred = predict(images)
    return float((pred == labels.detach().cpu().to(torch.int64)).float().mean())


def heldout_accuracy() -> float:
    """Held-out accuracy of the classifier on the real test split (a ceiling for sample accuracy)."""
    split = load_digits_split()
    return accuracy(split.test_images, split.test_labels)
