"""How the generated kernels are launched: directly, or through ``torch.library.wrap_triton``.

Two call sites exist:

- inside the opaque ``svdq::linear`` custom op the kernels run eagerly, so a plain
  ``kernel[grid](...)`` is enough (and cheapest);
- inside the ``svdq::triton_linear`` ``triton_op`` the body is *traced* by
  ``torch.compile`` / ``torch.export``; kernels must then go through ``wrap_triton`` so
  the tracer records them. In eager mode ``wrap_triton`` simply forwards the call.

Under ``TRITON_INTERPRET=1`` ``triton.jit`` returns an interpreted function that
``wrap_triton`` does not accept; tracing is not supported there and we call directly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

__all__ = ["interpreting", "launch"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_interpreted(kernel: Any) -> bool:
    # Class name check instead of an import: the interpreter class moved between releases.
    return type(kernel).__name__ == "InterpretedFunction"


def launch(
    kernel: Any,
    grid: Sequence[Any] | Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    wrap: bool,
    device: torch.device,
) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, wrapped for tracing when ``wrap``.

    Raises a clear error when CPU tensors reach a compiled (non-interpreted) kernel,
    which happens if ``TRITON_INTERPRET=1`` was set only after the kernels were defined.
    """
    interpreted = _is_interpreted(kernel)
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "svdq_compile.codegen: CPU tensors reached a compiled Triton kernel; set "
            "TRITON_INTERPRET=1 before svdq_compile.codegen's kernels are imported to run "
            "them in the interpreter"
        )
    if wrap and not interpreted:
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
