"""In-place version counters of tensors (change detection without comparing values)."""
from __future__ import annotations

import torch

__all__ = ["tensor_version"]


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``; -1 for inference-mode tensors, which have no version counter.

    Inference tensors can only be modified in place inside ``torch.inference_mode()``;
    callers compare identity there (documented where it matters).
    """
    try:
        return t._version
    except RuntimeError:
        return -1
