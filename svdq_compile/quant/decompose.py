"""SVDQuant per-layer decomposition: pure numerics, no graphs (docs/design.md section 1).

``W' = W * lambda``; ``L1 L2 = SVD_r(W')`` (float64, optionally refined);
``R = W' - L1 L2`` quantized to INT4 groups of 64 with fp16 scales.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from svdq_compile.runtime.torch_path import quantized_linear_cpu
from svdq_compile.runtime.ops import packed_args
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.runtime.modes import QuantMode, find_mode, get_mode

__all__ = [
    "LayerTarget",
    "smoothing_factors",
    "low_rank",
    "decompose_layer",
    "quantized_output",
    "sqnr_db",
    "search_candidates",
]

# Matrices with min(N, K) above this use randomized SVD (same error, see tests).
_EXACT_SVD_MAX_DIM = 4096
_LAMBDA_RANGE = (1e-4, 1e4)  # keeps X/lambda and W*lambda finite for degenerate channels
_OVERSAMPLE = 16  # extra directions for randomized / warm-started SVD (Halko et al.)
# Refinement rounds start from the previous round's factors: the target W' - Q(R) moves
# little between rounds, so two block power iterations match a fresh exact SVD.
_REFINE_POWER_ITERS = 2
# The smoothing search only ranks candidates: randomized SVD with one power iteration
# ranks them like the exact SVD at a fraction of the cost (``svdq bench --suite calib_time``).
_SEARCH_POWER_ITERS = 1
# Below this min(N, K) the exact eigh path is already cheap: keep it (same factors).
_FAST_SVD_MIN_DIM = 512


@dataclass(frozen=True)
class LayerTarget:
    """What to quantize one linear into: bit widths and activation signedness."""

    weight_bits: int = 4
    act_bits: int = 4
    group_size: int = 64
    rank: int = 32
    act_unsigned: bool = False
    refine_iters: int = 0
    scheme: str = "group"  # "group", or a per-token scheme ("int8", "fp8"; runtime/per_token.py)
    mode_reason: str = field(default="", compare=False)  # why this mode (explain()); not part of the key

    @property
    def qmode(self) -> QuantMode:
        return find_mode(self.weight_bits, self.act_bits, self.scheme)

    @classmethod
    def of(cls, mode: "str | QuantMode", **kwargs) -> "LayerTarget":
        """The target of a registered mode (name or object)."""
        m = get_mode(mode)
        return cls(weight_bits=m.weight_bits, act_bits=m.act_bits, scheme=m.scheme, **kwargs)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||ref|| / ||ref - test||)`` in dB (inf
    when equal). The one definition (tests and benchmarks use it too); numpy arrays work."""
    ref = torch.as_tensor(ref).double()
    err = (ref - torch.as_tensor(test).double()).norm().item()
    sig = ref.norm().item()
    if err == 0.0:
        return math.inf
    return 20.0 * math.log10(max(sig, 1e-300) / err)


def smoothing_factors(
    x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """``lambda_k = max|X_k|^alpha / max|W_k|^beta`` ([K] fp32).

    Channels with no activation or no weight magnitude get lambda = 1: dividing by a
    tiny lambda would blow up any value that appears there at run time.
    """
    x = x_absmax.double()
    w = w_absmax.double()
    lam = x.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(beta)
    lam = torch.where((x > 0) & (w > 0), lam, torch.ones_like(lam))
    lam = torch.nan_to_num(lam, nan=1.0, posinf=_LAMBDA_RANGE[1], neginf=1.0)
    return lam.clamp(*_LAMBDA_RANGE).float()


def search_candidates(grid: int) -> list[tuple[float, float]]:
    """(alpha, beta) candidates: (0, 0), and (a, 0), (a, 1 - a) for ``grid - 1`` values of a."""
    cands = [(0.0, 0.0)]
    if grid > 1:
        for i in range(1, grid):
            a = round(i / grid, 6)  # grid=20 gives 0.05 .. 0.95
            cands.append((a, 0.0))
            cands.append((a, round(1.0 - a, 6)))
    return cands


@contextlib.contextmanager
def _lapack_threads(dim: int):
    """Small LAPACK calls run 5x faster single-threaded (threads spin, esp. under load)."""
    old = torch.get_num_threads()
    if dim <= 1024 and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _subspace_iteration(w64: torch.Tensor, v0: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, ...]:
    """Top-r SVD of w64: [N, K] by block power iteration from a start basis v0: [K, q].

    Costs O(N K q) per iteration instead of the O(N K min(N, K)) of a Gram matrix; with
    a start basis near the answer (the previous refinement round's factors) two rounds
    reach the exact truncation error (tests/test_decompose.py).
    """
    v = torch.linalg.qr(v0).Q  # [K, q]
    for _ in range(iters):
        u = torch.linalg.qr(w64 @ v).Q  # [N, q]
        v = torch.linalg.qr(w64.t() @ u).Q  # [K, q]
    # Rayleigh-Ritz: the exact SVD of the small projection W V gives the best rank-r
    # approximation inside the found subspace.
    ub, s, vbh = torch.linalg.svd(w64 @ v, full_matrices=False)  # [N, q], [q], [q, q]
    return ub[:, :r], s[:r], (v @ vbh.t())[:, :r].t()


def low_rank(
    w: torch.Tensor,
    rank: int,
    seed: int = 0,
    exact: Optional[bool] = None,
    init: Optional[torch.Tensor] = None,
    niter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation ``up @ down`` of w: [N, K] in float64.

    Returns (up: [N, r], down: [r, K]) float64 with the singular values split as sqrt
    on both sides, so neither factor has a large dynamic range when stored in 16 bits.
    ``init`` ([r', K], e.g. the previous ``down``) warm-starts a block power iteration of
    ``niter`` rounds instead of a full decomposition; ``exact=False`` uses randomized
    SVD with ``niter`` power iterations.
    """
    n, k = w.shape
    r = min(rank, n, k)
    w64 = w.double()
    if r == 0:
        return w64.new_zeros(n, 0), w64.new_zeros(0, k)
    if init is not None:
        # Oversample the warm start with a few seeded random directions: they catch a
        # direction that moved into the top r since the start basis was computed.
        g = torch.Generator().manual_seed(seed)
        extra = min(_OVERSAMPLE, k - init.shape[0])
        rnd = torch.randn(k, max(extra, 0), generator=g, dtype=torch.float64).to(w64.device)  # CPU generator
        v0 = torch.cat([init.to(w64.device, torch.float64).t(), rnd], dim=1)
        u, s, vh = _subspace_iteration(w64, v0[:, : min(k, n, v0.shape[1])], r, niter)
        root = s.sqrt()
        return u * root, root[:, None] * vh
    if exact is None:
        exact = min(n, k) <= _EXACT_SVD_MAX_DIM
    if exact:
        # Truncated SVD through the eigendecomposition of the smaller Gram matrix: the
        # same subspace as gesdd in float64, and ~10-30x faster on CPU for these shapes.
        if k <= n:
            with _lapack_threads(k):
                evals, v = torch.linalg.eigh(w64.t() @ w64)  # ascending, [K], [K, K]
            v = v[:, -r:].flip(-1)  # [K, r] top right-singular vectors
            s = evals[-r:].flip(-1).clamp_min(0).sqrt()
            u = (w64 @ v) / s.clamp_min(1e-300)
            vh = v.t()
        else:
            with _lapack_threads(n):
                evals, u = torch.linalg.eigh(w64 @ w64.t())  # [N, N]
            u = u[:, -r:].flip(-1)
            s = evals[-r:].flip(-1).clamp_min(0).sqrt()
            vh = (u.t() @ w64) / s.clamp_min(1e-300)[:, None]
    else:
        # Randomized SVD: a few power iterations make it match the exact truncation
        # error for the fast-decaying spectra of smoothed weights.
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(w64, q=min(r + _OVERSAMPLE, min(n, k)), niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        u, s, vh = u[:, :r], s[:r], v[:, :r].t()
    root = s.sqrt()
    return u * root, root[:, None] * vh


def _quant_residual(res: torch.Tensor, target: LayerTarget) -> tuple[dict, torch.Tensor]:
    """Quantize the residual in the target's mode -> (PackedLinear weight fields, [N, K] float64 dequantized)."""
    mode = target.qmode
    fields = mode.quantize_weight(res, target.group_size)
    return fields, mode.dequantize_weight(fields, target.group_size).double()


def decompose_layer(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    target: LayerTarget,
    act_shift: float = 0.0,
    seed: int = 0,
    exact_svd: Optional[bool] = None,
    fast: bool = False,
) -> PackedLinear:
    """Decompose one linear ``weight: [N, K]`` into a :class:`PackedLinear`.

    ``smooth`` is lambda ([K]) or None. The low-rank factors are stored in the weight's
    dtype (16-bit for 16-bit models), the residual as INT4/INT8 with fp16 group scales.
    ``fast`` (the smoothing search) uses a cheap randomized SVD: good enough to rank
    candidates, not for the final factors.
    """
    n, k = weight.shape
    w = weight.double()
    if smooth is not None:
        w = w * smooth.double()[None, :]
    rank = min(target.rank, n, k)
    big = min(n, k) > _FAST_SVD_MIN_DIM
    if fast and big:
        up, down = low_rank(w, rank, seed=seed, exact=False, niter=_SEARCH_POWER_ITERS)
    else:
        up, down = low_rank(w, rank, seed=seed, exact=exact_svd)
    # Store the factors in the model dtype now and quantize the residual left by the
    # *stored* factors, so the quantizer absorbs the 16-bit rounding of the branch.
    lr_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    up_s, down_s = up.to(lr_dtype), down.to(lr_dtype)
    lr = up_s.double() @ down_s.double()
    qf, res_dq = _quant_residual(w - lr, target)
    err = (w - lr - res_dq).norm().item()
    for _ in range(target.refine_iters if rank else 0):
        # L = SVD_r(W' - Q(W' - L)): give the low-rank branch what the quantizer misses.
        if big:
            up2, down2 = low_rank(w - res_dq, rank, seed=seed, init=down_s, niter=_REFINE_POWER_ITERS)
        else:
            up2, down2 = low_rank(w - res_dq, rank, seed=seed, exact=exact_svd)
        up2_s, down2_s = up2.to(lr_dtype), down2.to(lr_dtype)
        lr2 = up2_s.double() @ down2_s.double()
        qf2, res_dq2 = _quant_residual(w - lr2, target)
        err2 = (w - lr2 - res_dq2).norm().item()
        if err2 >= err * (1 - 1e-4):  # stopped improving
            break
        up_s, down_s, qf, res_dq, err = up2_s, down2_s, qf2, res_dq2, err2
    b = None if bias is None else bias.detach().double()
    if act_shift:
        # Q(X' + s) R^T ~= X' R^T + s * rowsum(R): subtract the constant in the bias.
        corr = act_shift * res_dq.sum(dim=1)
        b = -corr if b is None else b - corr
    spec = LinearSpec(
        in_features=k,
        out_features=n,
        group_size=target.group_size,
        weight_bits=target.weight_bits,
        act_bits=target.act_bits,
        act_unsigned=target.act_unsigned,
        act_shift=float(act_shift),
        rank=rank,
        scheme=target.scheme,
    )
    out_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return PackedLinear(
        spec=spec,
        **qf,
        smooth=None if smooth is None else smooth.float().contiguous(),
        lora_down=down_s.contiguous() if rank else None,
        lora_up=up_s.contiguous() if rank else None,
        bias=None if b is None else b.to(out_dtype),
        meta={"weight_error": err, "mode_reason": target.mode_reason} if target.mode_reason else {"weight_error": err},
    )


def quantized_output(p: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """Run the quantized layer on CPU in fp32: x: [T, K] -> [T, N]."""
    f32 = {k: (v.float() if k in ("lora_down", "lora_up", "bias") else v) for k, v in p.tensors().items()}
    return quantized_linear_cpu(packed_args(x.float(), p.with_(**f32)))
