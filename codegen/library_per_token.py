"""The library composition of the per-token GEMM: the floor the fused kernel must beat.

``acc = qa @ w8^T`` by a vendor GEMM (one accumulator over all of K, nothing else), then
:mod:`.gemm_per_token`'s kernel in its ``FROM_ACC`` form does the whole epilogue in one pass:
``act(float(acc) * sa[m] * c[n] + h @ lora_up^T + bias) * gate + residual``.

- fp8 on CUDA (sm_89+): ``torch._scaled_mm`` with unit tensor-wise scales and an fp32
  output (the rowwise ``sa x c`` rescale happens in the epilogue, in fp32, exactly as in
  the fused kernel; rowwise-scaled ``_scaled_mm`` would round the product to bf16 before
  the low-rank branch is added). ``use_fast_accum`` matches Triton's default for fp8 dots
  on sm_90 (``max_num_imprecise_acc_default = 2**30``: the wgmma's own accumulation).
- int8 on CUDA: ``torch._int_mm`` (cuBLASLt, int32 out; K and N multiples of 8; it needs
  M > 16, so a small or symbolic M gets 17 zero rows appended, a copy of M x K bytes, and
  the product is sliced back). On wgmma GPUs (sm_90, sm_100) this is the only int8 GEMM:
  Triton's pipeliner waits for every wgmma of an int32 accumulator (docs/design.md section 2.1).
- CPU (tests, the interpreter): ``torch._int_mm`` for int8 and an fp32 matmul of the
  exactly-representable fp8 values for fp8 stand in for the library GEMM.
"""
from __future__ import annotations

import torch

__all__ = ["library_available", "library_product", "FP8_FAST_ACCUM"]

FP8_FAST_ACCUM = True
_INT_MM_MIN_M = 16  # torch._int_mm on CUDA requires M > 16


def library_available(scheme: str, m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether the library GEMM takes this shape on this device (else only the fused kernel)."""
    if device.type != "cuda":
        return scheme in ("int8", "fp8")
    if scheme == "fp8":
        major, minor = torch.cuda.get_device_capability(device)
        return hasattr(torch, "_scaled_mm") and (major, minor) >= (8, 9) and k % 16 == 0 and n % 16 == 0
    if scheme == "int8":
        # Any M, symbolic (torch.compile tracing) included: library_product pads small M.
        return hasattr(torch, "_int_mm") and k % 8 == 0 and n % 8 == 0
    return False


def library_product(qa: torch.Tensor, w8: torch.Tensor, scheme: str) -> torch.Tensor:
    """qa: [M, K], w8: [N, K] (both int8 or both e4m3) -> [M, N] int32 / fp32 accumulator."""
    if scheme == "int8":
        m = qa.shape[0]
        if isinstance(m, int) and m > _INT_MM_MIN_M:
            return torch._int_mm(qa, w8.t())  # B column-major: cuBLASLt's int8 "TN" layout
        # _int_mm needs M > 16: append zero rows (their products are 0 and are sliced away).
        padded = torch.cat([qa, qa.new_zeros((_INT_MM_MIN_M + 1, qa.shape[1]))])
        return torch._int_mm(padded, w8.t())[:m]
    if qa.is_cuda:
        one = torch.ones((), dtype=torch.float32, device=qa.device)
        return torch._scaled_mm(qa, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                use_fast_accum=FP8_FAST_ACCUM)
    return qa.float() @ w8.float().t()  # exact fp8 products, fp32 accumulation
