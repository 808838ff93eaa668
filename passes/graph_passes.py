"""Post-quantization graph passes on svdq::linear nodes, run in a fixed order.

1. ``fold_smoothing``: lambda moves into the producing norm / affine / AdaLN modulation.
2. ``fuse_siblings``: ops reading one tensor become one op (one activation quantization).
3. ``fuse_epilogue``: activation, gate and residual ops move into the op's epilogue
   (after sibling fusion, whose key requires ops without epilogue extras).

Each pass returns how many sites it rewrote; a pass that finds nothing leaves the graph
untouched (same graph text). The ops' tensors may be buffers or graph placeholders
(``example_inputs`` resolves the latter: models from ``svdq_compile.quantize``/``load``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx

from svdq_compile.quant.config import SVDQuantConfig

from svdq_compile.passes.fold_smoothing import fold_smoothing
from svdq_compile.passes.fuse_epilogue import fuse_epilogue
from svdq_compile.passes.fuse_siblings import fuse_siblings
from svdq_compile.passes.op_nodes import GraphTensors, canonicalize

__all__ = ["run_graph_passes", "PASSES"]

log = logging.getLogger(__name__)

# (report name, config flag, pass(gm, tensors) -> count), in run order.
PASSES: tuple[tuple[str, str, Callable[..., int]], ...] = (
    ("fold_smoothing", "fold_smoothing", fold_smoothing),
    ("fuse_siblings", "fuse_siblings", fuse_siblings),
    ("fuse_epilogue", "fuse_epilogue", fuse_epilogue),
)


def run_graph_passes(
    gm: fx.GraphModule,
    config: SVDQuantConfig,
    example_inputs: Optional[Sequence[Any]] = None,
    dump: Optional[Callable[[fx.GraphModule, str], None]] = None,
) -> dict[str, int]:
    """Run the enabled passes in order on ``gm`` (in place).

    Returns ``{pass name: sites it rewrote}`` (0 when disabled). ``dump(gm, tag)`` is
    called after each enabled pass (``SVDQuantConfig.dump_graphs``).
    """
    canonicalize(gm)  # Dynamo records module calls as torch.ops.svdq.linear (the packet)
    tensors = GraphTensors(gm, example_inputs)
    counts: dict[str, int] = {}
    for name, flag, fn in PASSES:
        if not getattr(config, flag):
            counts[name] = 0
            continue
        counts[name] = fn(gm, tensors)
        log.debug("svdquant pass %s: %d", name, counts[name])
        if dump is not None:
            dump(gm, f"after_{name}")
    return counts
