"""``svdq::triton_linear``: the Triton quantized linear as a ``torch.library.triton_op``.

Unlike the opaque ``svdq::linear`` custom op, a ``triton_op`` lets ``torch.compile``
(Inductor) and ``torch.export`` trace *into* the Python body: the kernels, launched via
``wrap_triton``, become graph nodes Inductor schedules with the rest of the model, and
the fake (meta) implementation is derived from the same body. Passes may emit this op
directly on CUDA; its eager behaviour equals ``svdq::linear``'s Triton path.

While traced, the body sees fake tensors and symbolic M: the autotuner then uses cached
or default configs only (see :func:`.autotune.choose_config`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from svdq_compile.runtime.op_args import with_signature
from svdq_compile.codegen.linear import quantized_linear_triton

__all__ = ["TRITON_OP_AVAILABLE", "triton_linear"]

log = logging.getLogger(__name__)

TRITON_OP_AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


@with_signature  # triton_op infers its schema from the signature: LinearArgs' list
def _triton_linear_impl(*args: Any, **kwargs: Any) -> torch.Tensor:
    return quantized_linear_triton(*args, wrap=True, **kwargs)


triton_linear = None
if TRITON_OP_AVAILABLE:
    try:
        triton_linear = torch.library.triton_op("svdq::triton_linear", mutates_args=())(_triton_linear_impl)
    except Exception as e:  # noqa: BLE001 - e.g. registered twice on module reload
        log.debug("svdq::triton_linear not registered: %s", e)
