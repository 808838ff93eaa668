"""Image metrics for the demo: PSNR and SSIM of quantized samples vs the fp32 samples."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]

_RANGE = 2.0  # images live in [-1, 1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB over a batch ``[B, 1, H, W]`` (clipped to [-1, 1], peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(_RANGE ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 3) -> float:
    """Mean SSIM (Wang et al. 2004) with a uniform ``window`` x ``window`` window.

    8x8 digits are too small for the usual 11x11 Gaussian window; a 3x3 window keeps
    a 6x6 valid map per image.
    """
    x = a.clamp(-1, 1).double()
    y = b.clamp(-1, 1).double()
    c1, c2 = (0.01 * _RANGE) ** 2, (0.03 * _RANGE) ** 2
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx = pool(x * x) - mx * mx
    vy = pool(y * y) - my * my
    cxy = pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
