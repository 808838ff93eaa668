"""Post-quantization graph passes (smoothing folding, epilogue fusion), in order."""
from __future__ import annotations

import torch.fx as fx

from svdq_compile.config import SVDQuantConfig

__all__ = ["run_graph_passes"]


def run_graph_passes(gm: fx.GraphModule, config: SVDQuantConfig) -> dict[str, int]:
    """Run the enabled passes on a rewritten graph; returns {pass name: sites rewritten}."""
    return {}
