"""The one argument list of ``svdq::linear``.

The schema of the custom op, its fake implementation, the CPU / Triton / unfused
implementations, the graph passes (argument positions) and the exporters all read
their parameters from :class:`LinearArgs`, so a new argument is added here once.
Arguments added after the first release come last and have defaults, so positional
calls written for the older 15-argument form keep working.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, TypeVar, get_type_hints

import torch

from svdq_compile.runtime.modes import get_scheme

__all__ = ["LinearArgs", "SCHEMA", "SIGNATURE", "ARG", "ARG_NAMES", "TENSOR_ARGS", "bind", "with_signature"]


class LinearArgs(NamedTuple):
    """Inputs of one quantized linear ``Y = act(Q(X') W_q^T + (X' L2^T) L1^T + b) * gate + residual``.

    Shapes: x [..., K]; qweight [N, K/2] int8 (4-bit, packed) or [N, K] int8; wscales
    [N, K/G] (fp16 group scales; int8 integer group scales for ``scheme="int8"``);
    smooth [K]; lora_down [r, K]; lora_up [N, r]; bias [N]; residual/gate broadcast to
    [..., N]; wzeros [N, K/G] int8 (``int8`` only); wchannel [N] fp32 per-channel scale
    (``int8`` and ``fp8`` only). ``scheme``: ``"group"`` (group scales on both operands),
    ``"int8"`` / ``"fp8"`` (per-token 8-bit activations, see :mod:`.per_token`).
    """

    x: torch.Tensor
    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: Optional[torch.Tensor]
    lora_down: Optional[torch.Tensor]
    lora_up: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]
    group_size: int
    weight_bits: int
    act_bits: int
    act_unsigned: bool
    act_shift: float
    epilogue: str
    wzeros: Optional[torch.Tensor] = None
    wchannel: Optional[torch.Tensor] = None
    scheme: str = "group"

    @property
    def n(self) -> int:
        return int(self.wscales.shape[0])

    @property
    def per_token(self) -> bool:
        return get_scheme(self.scheme).per_token


ARG_NAMES: tuple[str, ...] = LinearArgs._fields
# Positional index of each argument (graph passes read and write nodes through it).
ARG: dict[str, int] = {name: i for i, name in enumerate(ARG_NAMES)}

_SCHEMA_TYPES = {
    torch.Tensor: "Tensor", Optional[torch.Tensor]: "Tensor?", int: "int", bool: "bool", float: "float", str: "str",
}


_HINTS = get_type_hints(LinearArgs)


def _schema() -> str:
    parts = []
    for name in ARG_NAMES:
        typ = _SCHEMA_TYPES[_HINTS[name]]
        if name in LinearArgs._field_defaults:
            d = LinearArgs._field_defaults[name]
            default = "None" if d is None else (f"'{d}'" if isinstance(d, str) else repr(d))
            parts.append(f"{typ} {name}={default}")
        else:
            parts.append(f"{typ} {name}")
    return "(" + ", ".join(parts) + ") -> Tensor"


SCHEMA: str = _schema()
TENSOR_ARGS: tuple[str, ...] = tuple(n for n in ARG_NAMES if _SCHEMA_TYPES[_HINTS[n]].startswith("Tensor"))


# The same list as a Python signature, for APIs that infer the schema from a function's
# signature (torch.library.triton_op ignores an explicit schema).
SIGNATURE = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_HINTS[n],
                       default=LinearArgs._field_defaults.get(n, inspect.Parameter.empty)) for n in ARG_NAMES],
    return_annotation=torch.Tensor,
)

_F = TypeVar("_F", bound=Callable[..., Any])


def with_signature(fn: _F) -> _F:
    """Give ``fn(*args, **kwargs)`` the op's signature (``inspect.signature`` reads it)."""
    fn.__signature__ = SIGNATURE  # type: ignore[attr-defined]
    return fn


def bind(*args: Any, **kwargs: Any) -> LinearArgs:
    """Positional and/or keyword arguments (the op's calling convention) -> LinearArgs."""
    if len(args) == 1 and not kwargs and isinstance(args[0], LinearArgs):
        return args[0]
    try:
        return LinearArgs(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"svdq.linear: bad arguments ({e}); expected {SCHEMA}") from None
