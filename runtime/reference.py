"""Pure-PyTorch reference of the quantized linear: the test oracle for every kernel.

It follows docs/design.md section 1 step 5 literally:
``Y = Q(X') Q(R)^T (per-group rescale) + (X' L2^T) L1^T + b`` with ``X' = X / smooth``.
The integer GEMM is evaluated as a dequantize-then-matmul in ``compute_dtype``
(float64 by default: every int4*scale product and the 64-term sums are exact there,
so this *is* the exact integer GEMM up to the final rounding).
"""
from __future__ import annotations

from typing import Optional

import torch

from svdq_compile.runtime.epilogue import finish_output
from svdq_compile.runtime.packing import unpack_int4
from svdq_compile.runtime.per_token import expanded_weight, quantize_tokens
from svdq_compile.runtime.quantize import dequantize_groups, quantize_activation

__all__ = ["smooth_input", "quantized_linear_reference", "int_weight"]


def smooth_input(x2d: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """x2d: [M, K] -> X' = X / smooth in fp32 (the kernels divide in fp32 too)."""
    xs = x2d.float()
    if smooth is not None:
        xs = xs / smooth.float()
    return xs


def int_weight(qweight: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """[N, K//2] packed or [N, K] int8 -> [N, K] int8."""
    return unpack_int4(qweight, signed=True) if weight_bits == 4 else qweight


def quantized_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    lora_down: Optional[torch.Tensor] = None,
    lora_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    group_size: int = 64,
    weight_bits: int = 4,
    act_bits: int = 4,
    act_unsigned: bool = False,
    act_shift: float = 0.0,
    epilogue: str = "none",
    compute_dtype: torch.dtype = torch.float64,
    wzeros: Optional[torch.Tensor] = None,
    wchannel: Optional[torch.Tensor] = None,
    scheme: str = "group",
) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype. See module docstring for the math.

    Per-token schemes (``"int8"``, ``"fp8"``, :mod:`.per_token`): the 8-bit product of the
    quantized activations and the expanded weights, rescaled by ``sa[m] * c[n]``.
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = wscales.shape[0]
    xs = smooth_input(x.reshape(-1, k), smooth)  # [M, K] fp32
    if scheme != "group":
        qa, sa = quantize_tokens(xs, scheme)  # [M, K] int8/e4m3, [M] fp32
        e = expanded_weight(scheme, qweight, wscales, wzeros, wchannel, group_size)  # [N, K] int8/e4m3
        acc = qa.to(compute_dtype) @ e.to(compute_dtype).t()  # exact: 8-bit products, float64 sums
        y = acc * sa.to(compute_dtype)[:, None] * wchannel.to(compute_dtype)[None, :]
    else:
        w_dq = dequantize_groups(int_weight(qweight, weight_bits), wscales, group_size)  # [N, K] fp32
        if act_bits == 16:
            a_dq = xs
        else:
            qa, sa = quantize_activation(xs, act_bits, group_size, unsigned=act_unsigned, shift=act_shift)
            a_dq = dequantize_groups(qa, sa, group_size)  # [M, K] fp32, exact products
        y = a_dq.to(compute_dtype) @ w_dq.to(compute_dtype).t()  # [M, N]
    if lora_down is not None:
        # The low-rank branch reads the *unquantized* smoothed input.
        h = xs.to(compute_dtype) @ lora_down.to(compute_dtype).t()  # [M, r]
        y = y + h @ lora_up.to(compute_dtype).t()
    res2 = None if residual is None else residual.expand(*lead, n).reshape(-1, n).to(compute_dtype)
    gate2 = None if gate is None else gate.expand(*lead, n).reshape(-1, n).to(compute_dtype)
    y = finish_output(y, bias, epilogue, gate2, res2)
    return y.to(x.dtype).reshape(*lead, n)
