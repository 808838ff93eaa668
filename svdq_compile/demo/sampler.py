"""Euler sampler for rectified flow with batched classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from svdq_compile.demo.model import NULL_LABEL, DemoConfig, unpatchify

__all__ = ["ModelFn", "initial_noise", "sample"]

#: ``model_fn(x_tokens [N, 16, 4], t [N], labels [N]) -> velocity [N, 16, 4]``.
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def initial_noise(batch: int, seed: int, cfg: DemoConfig = DemoConfig()) -> Tensor:
    """Starting noise ``[B, 16, 4]`` (float32, CPU).

    Drawn from a private CPU generator so that the same seed yields bit-identical
    noise whatever model, device or dtype is sampled afterwards; that is what
    makes fp32-vs-quantized sample comparisons meaningful.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, cfg.num_tokens, cfg.token_channels, generator=gen, dtype=torch.float32)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    labels: Tensor,
    steps: int = 20,
    guidance: float = 1.5,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cfg: DemoConfig = DemoConfig(),
) -> Tensor:
    """Generate digits by integrating ``dx/dt = v`` from ``t=1`` (noise) to ``t=0`` (data).

    With rectified flow ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``, so a
    step from ``t`` to ``t' < t`` is ``x <- x + (t' - t) v``. Guidance is
    ``v = v_uncond + g (v_cond - v_uncond)``; both branches run as one batch of
    ``2B`` so every model call has the same shape (one compiled graph) and the
    quantized kernels see realistic batch sizes.

    Args:
        model_fn: velocity model on packed tokens, e.g. a ``DigitFlow`` or a
            ``torch.compile``'d one.
        labels: ``[B]`` digit labels 0..9.
        steps: number of Euler steps.
        guidance: CFG scale ``g`` (1.0 = purely conditional prediction).
        seed: seed of the initial noise (see :func:`initial_noise`).
        progress: show a tqdm bar.
        device: where to run ``model_fn``; default CPU.
        dtype: dtype of the state fed to ``model_fn``; the ODE state itself
            is integrated in float32.
        cfg: model geometry (token count, image size).

    Returns:
        ``[B, 1, 8, 8]`` float32 images on ``device``, nominally in ``[-1, 1]``
        (not clipped).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    labels = labels.to(device=device, dtype=torch.int64)  # [B]
    batch = labels.shape[0]
    x = initial_noise(batch, seed, cfg).to(device)  # x: [B, 16, 4], float32
    # Unconditional half first, then conditional: [2B]
    both_labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)  # [steps + 1]

    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x_in = torch.cat([x, x]).to(dtype)  # [2B, 16, 4]
        t_in = torch.full((2 * batch,), t, device=device, dtype=dtype)  # [2B]
        v = model_fn(x_in, t_in, both_labels).float()  # [2B, 16, 4]
        v_uncond, v_cond = v.chunk(2)  # [B, 16, 4] each
        v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (t_next - t) * v

    return unpatchify(x, cfg.image_size, cfg.image_size, cfg.patch)  # [B, 1, 8, 8]
