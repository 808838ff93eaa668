"""The quantized state of a ``torch.compile(model, backend="svdquant")`` model, as modules.

The backend quantizes inside its compiled graphs; the eager module keeps its float
``nn.Linear`` layers. What it quantized is recorded on each weight tensor
(``weight._svdq_packed``, a :class:`~svdq_compile.runtime.packed.PackedLinear`; see
``passes/pipeline.py``), which is also what :func:`svdq_compile.save` reads
(:func:`svdq_compile.export.artifacts.collect_packed`). :func:`compiled_as_modules` swaps those
layers for :class:`~svdq_compile.SVDQLinear` modules for the duration of an export and
puts the original modules back afterwards, so the compiled model is left as it was.

The exported graph is the eager model with quantized linears: the backend's graph passes
(sibling fusion, smoothing folded into a producer, fused epilogues) change where the
operations run, not what they compute, so outputs agree up to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from svdq_compile.quant.modules import SVDQLinear

__all__ = ["is_compiled", "compiled_as_modules", "NotQuantizedYetError"]


class NotQuantizedYetError(ValueError):
    """A ``torch.compile``'d model whose backend has not quantized anything yet."""


def is_compiled(model: object) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``)."""
    return isinstance(model, nn.Module) and hasattr(model, "_orig_mod") and hasattr(model, "dynamo_ctx")


def _packed_linears(model: nn.Module) -> dict[str, object]:
    return {name: m.weight._svdq_packed for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and getattr(m.weight, "_svdq_packed", None) is not None}


@contextlib.contextmanager
def compiled_as_modules(model: nn.Module, compiled: bool = False) -> Iterator[int]:
    """Within the ``with`` block, every linear the backend quantized is an SVDQLinear; yields
    how many were swapped (0: nothing recorded). ``compiled``: the caller was given a
    ``torch.compile`` wrapper (only changes the error for a model with nothing recorded)."""
    packed = _packed_linears(model)
    has_modules = any(isinstance(m, SVDQLinear) for m in model.modules())
    if not packed and not has_modules and compiled:
        raise NotQuantizedYetError(
            "svdq_compile.export_onnx: this torch.compile'd model holds no quantized layers yet. The svdquant "
            "backend calibrates on the model's first calls (options 'calib_calls', default 2) and quantizes "
            "after them: run the compiled model on representative inputs first (e.g. two denoising steps), "
            "then export it. (Or use svdq_compile.quantize(model, ...) and export the eager model.)"
        )
    originals = {name: model.get_submodule(name) for name in packed}
    try:
        for name, p in packed.items():
            lin = originals[name]
            model.set_submodule(name, SVDQLinear(p.to(lin.weight.device), name))
        yield len(packed)
    finally:
        for name, lin in originals.items():
            model.set_submodule(name, lin)
