"""FLUX.1 building blocks with random seeded weights, and their inputs.

Real FLUX.1 dims: hidden 3072 = 24 heads x 128, MLP 12288, RoPE axes (16, 56, 56).
``reduced=True`` keeps the architecture (head dim 128, MLP ratio 4) at 6 heads
(hidden 768): 16x fewer weights, for the quick CPU runs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["BlockHost", "FluxDims", "FULL", "REDUCED", "make_block", "block_inputs", "fast_svd", "FLUX1_CONFIG"]


@dataclass(frozen=True)
class FluxDims:
    heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    axes: tuple[int, int, int] = (16, 56, 56)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def label(self) -> str:
        return f"hidden {self.hidden} ({self.heads}x{self.head_dim}), MLP {int(self.hidden * self.mlp_ratio)}"


FULL = FluxDims()
REDUCED = FluxDims(heads=6)

# FLUX.1-dev transformer (diffusers FluxTransformer2DModel config).
FLUX1_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


class BlockHost(nn.Module):
    """One block held under its FLUX.1 name (``transformer_blocks.0`` or
    ``single_transformer_blocks.0``), so layer names, and with them the default
    ``skip`` / ``mode_overrides`` patterns, are those of the full model (a bare single
    block's ``proj_out`` would match the skip pattern meant for the model's last layer).
    """

    def __init__(self, kind: str, block: nn.Module) -> None:
        super().__init__()
        self.attr = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        setattr(self, self.attr, nn.ModuleList([block]))

    @property
    def prefix(self) -> str:
        return f"{self.attr}.0."

    def forward(self, *args):
        return getattr(self, self.attr)[0](*args)


def make_block(kind: str, dims: FluxDims, device: str, dtype: torch.dtype, seed: int = 0) -> BlockHost:
    """``kind`` = "double" (FluxTransformerBlock) or "single" (FluxSingleTransformerBlock),
    inside a :class:`BlockHost`."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "double":
            blk = FluxTransformerBlock(dim=dims.hidden, num_attention_heads=dims.heads,
                                       attention_head_dim=dims.head_dim)
        elif kind == "single":
            blk = FluxSingleTransformerBlock(dim=dims.hidden, num_attention_heads=dims.heads,
                                             attention_head_dim=dims.head_dim, mlp_ratio=dims.mlp_ratio)
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return BlockHost(kind, blk).to(device, dtype).eval().requires_grad_(False)


def _ids(img: int, txt: int) -> torch.Tensor:
    """RoPE position ids: text tokens at (0, 0, 0), image tokens on a (row, col) grid."""
    w = max(1, math.ceil(math.sqrt(img)))
    i = torch.arange(img)
    img_ids = torch.stack([torch.zeros(img), (i // w).float(), (i % w).float()], dim=-1)
    return torch.cat([torch.zeros(txt, 3), img_ids])


def block_inputs(dims: FluxDims, img: int, txt: int, device: str, dtype: torch.dtype, seed: int) -> tuple:
    """(hidden_states [1, img, D], encoder_hidden_states [1, txt, D], temb [1, D], (cos, sin))."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, img, dims.hidden, generator=g)
    e = torch.randn(1, txt, dims.hidden, generator=g)
    temb = torch.randn(1, dims.hidden, generator=g)
    rope = FluxPosEmbed(theta=10000, axes_dim=list(dims.axes))(_ids(img, txt))
    # diffusers applies RoPE in fp32 (it casts cos/sin itself).
    return (h.to(device, dtype), e.to(device, dtype), temb.to(device, dtype),
            tuple(r.to(device) for r in rope))


@contextlib.contextmanager
def fast_svd(max_exact_dim: int = 1024) -> Iterator[None]:
    """Randomized SVD for layers with min(N, K) > ``max_exact_dim`` while quantizing for
    the benchmarks.

    ``svdq_compile.quant.decompose`` takes an exact float64 eigendecomposition up to
    min(N, K) = 4096 (all FLUX layers): minutes per real-size block on a 2-core CPU.
    Small layers keep the exact path (single-threaded LAPACK, fast even on a busy
    machine). Speed and weight bytes do not depend on which SVD found the factors.
    """
    from svdq_compile.quant import decompose

    old = decompose._EXACT_SVD_MAX_DIM
    decompose._EXACT_SVD_MAX_DIM = min(old, max_exact_dim)
    try:
        yield
    finally:
        decompose._EXACT_SVD_MAX_DIM = old
