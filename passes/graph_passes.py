"""Post-quantization graph passes on svdq::linear nodes, run in a fixed order."""
from __future__ import annotations

import torch.fx as fx

from svdq_compile.config import SVDQuantConfig

from .fuse_siblings import fuse_siblings

__all__ = ["run_graph_passes"]


def run_graph_passes(gm: fx.GraphModule, config: SVDQuantConfig) -> dict[str, int]:
    """Run the enabled passes; returns {pass name: sites it rewrote} (0 when disabled)."""
    counts: dict[str, int] = {}
    counts["fuse_siblings"] = fuse_siblings(gm) if config.fuse_siblings else 0
    return counts
