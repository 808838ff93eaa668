"""Per-token kernels (``w4a8-int8``, ``w4a8-fp8``): prologue, weight expansion, GEMM, composition.

Exactness: the prologue's 8-bit activations and scales and the expanded weights equal the
torch definitions (runtime/per_token.py) byte for byte. The GEMM is compared with the
float64 reference of the same quantized operands (runtime.reference): the 8-bit products
are exact, int8 sums are exact in int32 and fp8 sums carry fp32 accumulation error
(~K * 2**-24 relative at worst, ~1e-7 typical for these K), then a few fp32 roundings
(rescale, low-rank dot, bias, activation, gate, residual). A Frobenius relative error
below 1e-5 leaves two orders of magnitude over that noise while any indexing, scale or
masking bug shows up at 1e-3 or worse. On a GPU the fp8 dot accumulates as the wgmma does
(Triton's default on sm_90, ``max_num_imprecise_acc``, like cuBLAS fast accumulation):
the tolerance there is 2e-3, still far below an indexing bug (O(1)).
"""
import logging

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from tests.codegen.codegen_helpers import CAN_RUN, DEVICE, rel_err  # noqa: E402

import svdq_compile.codegen as codegen  # noqa: E402
from svdq_compile.codegen import autotune, fallback, per_token_linear as ptl  # noqa: E402
from svdq_compile.codegen.autotune import AutotuneError, PrologueConfig, PtGemmConfig  # noqa: E402
from svdq_compile.codegen.expand_weight import KEEP_ENV, run_expand  # noqa: E402
from svdq_compile.codegen.gemm import EpilogueInputs  # noqa: E402
from svdq_compile.codegen.gemm_per_token import run_gemm_pt  # noqa: E402
from svdq_compile.codegen.library_per_token import library_available  # noqa: E402
from svdq_compile.codegen.linear import quantized_linear_triton  # noqa: E402
from svdq_compile.codegen.prologue_per_token import run_prologue_pt, to_e4m3  # noqa: E402
from svdq_compile.codegen.spec import KernelSpec  # noqa: E402
from svdq_compile.runtime.torch_path import PT_CACHE_ATTR, quantized_linear_cpu  # noqa: E402
from svdq_compile.runtime.op_args import LinearArgs  # noqa: E402
from svdq_compile.runtime.ops import triton_on_cpu  # noqa: E402
from svdq_compile.runtime.per_token import (  # noqa: E402
    FP8_DTYPE, expanded_weight, quantize_tokens, quantize_weight_fp8, quantize_weight_progressive,
)
from svdq_compile.runtime.reference import quantized_linear_reference, smooth_input  # noqa: E402

pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")

SCHEMES = ("int8", "fp8")
K = 192  # three groups of 64; not a multiple of the fp8 GEMM's 128-wide K step on GPU


def _tol(scheme: str) -> float:
    return 2e-3 if DEVICE.type == "cuda" and scheme == "fp8" else 1e-5  # see the module docstring


@pytest.fixture(scope="module", autouse=True)
def _installed():
    assert codegen.available()
    assert codegen.install()


@pytest.fixture(autouse=True)
def _no_silent_fallback(monkeypatch):
    """Kernel tests must run the kernels: the torch fallback raises unless a test allows it."""
    def boom(*a, **k):
        raise AssertionError("the per-token kernels fell back to the torch path")

    monkeypatch.setattr(ptl, "quantized_linear_cpu", boom)  # scheme not covered by the kernels
    monkeypatch.setattr(fallback, "quantized_linear_cpu", boom)  # a kernel failed
    monkeypatch.setattr(fallback, "_FAILED", set())
    monkeypatch.setattr(fallback, "_WARNED", [])


def _layer(scheme, n, k, *, rank=8, smooth=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, ::7] *= 8.0  # outlier input channels
    if scheme == "int8":
        qw, s, z, c = quantize_weight_progressive(w, 64)
    else:
        (qw, s, c), z = quantize_weight_fp8(w, 64), None
    t = dict(
        qweight=qw, wscales=s, wzeros=z, wchannel=c,
        smooth=(torch.rand(k, generator=g) + 0.5) if smooth else None,
        lora_down=(torch.randn(rank, k, generator=g) / k**0.5) if rank else None,
        lora_up=(torch.randn(n, rank, generator=g) / rank**0.5) if rank else None,
        bias=(torch.randn(n, generator=g) * 0.1) if bias else None,
    )
    return {name: None if v is None else v.to(DEVICE) for name, v in t.items()}


def _input(m, k, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3::17] *= 10.0
    return x.to(dtype).to(DEVICE)


def _args(x, lay, scheme, *, gate=None, residual=None, epilogue="none") -> LinearArgs:
    return LinearArgs(x, lay["qweight"], lay["wscales"], lay["smooth"], lay["lora_down"], lay["lora_up"],
                      lay["bias"], residual, gate, 64, 4, 8, False, 0.0, epilogue,
                      lay["wzeros"], lay["wchannel"], scheme)


def _reference(a: LinearArgs) -> torch.Tensor:
    return quantized_linear_reference(
        a.x, a.qweight, a.wscales, a.smooth, a.lora_down, a.lora_up, a.bias, a.residual, a.gate,
        group_size=64, act_bits=8, epilogue=a.epilogue, wzeros=a.wzeros, wchannel=a.wchannel, scheme=a.scheme)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


# ------------------------------------------------------------------ FP8 rounding
@triton.jit
def _e4m3_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, to_e4m3(tl.load(x_ptr + o), True))


def test_soft_e4m3_matches_torch_on_every_boundary():
    """The interpreter's integer fp32 -> e4m3 conversion == torch's RNE + saturation."""
    if DEVICE.type == "cuda":
        pytest.skip("the integer conversion is the interpreter's; GPUs convert with cvt.rn.satfinite")
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    vals = vals[torch.isfinite(vals) & (vals >= 0)].unique()  # 0 .. 448
    mids = (vals[1:] + vals[:-1]) / 2  # the ties
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), vals])
    g = torch.Generator().manual_seed(0)
    rnd = torch.cat([torch.randn(2048, generator=g) * s for s in (1e-4, 3e-3, 0.02, 0.3, 5.0, 100.0)])
    extra = torch.tensor([0.0, 448.0, 449.0, 463.9, 464.0, 500.0, 1e30, float("inf"), 2.0**-10, 2.0**-9 * 1.5])
    x = torch.cat([near, -near, rnd, extra, -extra])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    y = torch.empty(n, dtype=FP8_DTYPE)
    _e4m3_kernel[(1,)](x, y, N=n)
    assert torch.equal(y.view(torch.uint8), x.to(FP8_DTYPE).view(torch.uint8))


# ------------------------------------------------------------------ prologue
@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_prologue_bit_exact(scheme, smooth, rank):
    m, k = 37, 160  # K not a multiple of the 64-wide K tile: the masked path
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(DEVICE)
    x[5] = 0.0  # all-zero row -> scale 1
    sm = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    ld = torch.randn(rank, k, generator=g).to(DEVICE) if rank else None
    spec = KernelSpec(weight_bits=4, act_bits=8, rank=rank, has_smooth=smooth, in_dtype=torch.float32,
                      out_dtype=torch.float32, scheme=scheme)
    qa, sa, h = run_prologue_pt(x, sm, ld, spec, config=PrologueConfig(16, 4, 1))
    xs = smooth_input(x, sm)
    rq, rs = quantize_tokens(xs, scheme)
    assert qa.dtype == rq.dtype and torch.equal(_bytes(qa), _bytes(rq))
    assert torch.equal(sa.cpu(), rs.cpu()) and float(sa[5]) == 1.0
    if rank:
        ref_h = xs.double() @ ld.double().t()
        assert rel_err(h, ref_h) < 1e-5  # fp32 dot over K


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prologue_bf16_strided_input(scheme):
    x = _input(40, 2 * K, dtype=torch.bfloat16)[:, ::2]  # column stride 2, K = 192
    spec = KernelSpec(weight_bits=4, act_bits=8, rank=0, in_dtype=torch.bfloat16, scheme=scheme)
    qa, sa, _ = run_prologue_pt(x, None, None, spec)
    rq, rs = quantize_tokens(smooth_input(x, None), scheme)
    assert torch.equal(_bytes(qa), _bytes(rq)) and torch.equal(sa.cpu(), rs.cpu())


# ------------------------------------------------------------------ expansion
@pytest.mark.parametrize("n", [72, 200])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_expand_bit_exact(scheme, n):
    lay = _layer(scheme, n, K, seed=n)
    e = run_expand(_args(_input(1, K), lay, scheme))
    ref = expanded_weight(scheme, lay["qweight"], lay["wscales"], lay["wzeros"], lay["wchannel"], 64)
    assert e.dtype == ref.dtype and torch.equal(_bytes(e), _bytes(ref))


# ------------------------------------------------------------------ fused GEMM, end to end
@pytest.mark.parametrize("n", [72, 200])
@pytest.mark.parametrize("m", [1, 17, 130])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_linear_shapes(scheme, m, n):
    a = _args(_input(m, K), _layer(scheme, n, K), scheme, epilogue="gelu")
    y = quantized_linear_triton(a, lora_precision="ieee")
    ref = _reference(a)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) < _tol(scheme)


EPILOGUES = [  # (activation, bias, gate, residual, rank)
    ("none", False, False, False, 0),
    ("none", True, False, False, 8),
    ("gelu", True, False, False, 8),
    ("gelu_tanh", True, False, False, 0),
    ("silu", False, False, False, 8),
    ("relu", True, False, False, 8),
    ("none", True, True, False, 8),
    ("none", False, False, True, 8),
    ("gelu_tanh", True, True, True, 8),
    ("silu", True, True, True, 0),
]


@pytest.mark.parametrize("epilogue,bias,gate,residual,rank", EPILOGUES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_epilogues(scheme, epilogue, bias, gate, residual, rank):
    b, t, n = 3, 6, 72
    g = torch.Generator().manual_seed(5)
    gt = torch.randn(b, 1, n, generator=g).to(DEVICE) if gate else None  # broadcast over tokens
    rs = torch.randn(b, t, n, generator=g).to(DEVICE) if residual else None
    x = _input(b * t, K).reshape(b, t, K)
    a = _args(x, _layer(scheme, n, K, rank=rank, bias=bias), scheme, gate=gt, residual=rs, epilogue=epilogue)
    y = quantized_linear_triton(a, lora_precision="ieee")
    assert y.shape == (b, t, n)
    assert rel_err(y, _reference(a)) < _tol(scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_activations(scheme):
    """bf16 in/out: the output rounding (2**-9 relative) dominates."""
    lay = {k: v.to(torch.bfloat16) if k in ("lora_down", "lora_up", "bias", "smooth") else v
           for k, v in _layer(scheme, 72, K).items()}
    a = _args(_input(33, K, dtype=torch.bfloat16), lay, scheme, epilogue="silu")
    y = quantized_linear_triton(a, lora_precision="ieee")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, _reference(a)) < 2**-8


# ------------------------------------------------------------------ library composition
@pytest.mark.parametrize("m", [1, 17, 130])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_library_composition(scheme, m):
    n = 208  # off the 64/128 block grid; _scaled_mm needs N % 16 == 0
    if not library_available(scheme, m, n, K, DEVICE):
        pytest.skip("the library GEMM does not take this shape here (e.g. _int_mm needs M > 16 on CUDA)")
    g = torch.Generator().manual_seed(7)
    gt = torch.randn(m, n, generator=g).to(DEVICE)
    rs = torch.randn(m, n, generator=g).to(DEVICE)
    a = _args(_input(m, K), _layer(scheme, n, K), scheme, gate=gt, residual=rs, epilogue="gelu_tanh")
    spec = KernelSpec(weight_bits=4, act_bits=8, rank=8, epilogue="gelu_tanh", has_smooth=True, has_bias=True,
                      has_gate=True, has_residual=True, in_dtype=torch.float32, out_dtype=torch.float32,
                      scheme=scheme)
    qa, sa, h = run_prologue_pt(a.x, a.smooth, a.lora_down, spec)
    w8 = run_expand(a)
    cfg = PtGemmConfig(64, 64, 32, 2, 4, 1, library=True)
    inputs = EpilogueInputs(h, a.lora_up, a.bias, gt, rs)
    y = run_gemm_pt(qa, sa, w8, a.wchannel, inputs, spec, (m,), config=cfg)
    fused = run_gemm_pt(qa, sa, w8, a.wchannel, inputs, spec, (m,), config=PtGemmConfig(64, 64, 64, 2, 4, 1))
    ref = _reference(a)
    assert rel_err(y, ref) < _tol(scheme) and rel_err(fused, ref) < _tol(scheme)
    if scheme == "int8":  # the same exact int32 accumulator, the same epilogue code
        assert torch.equal(y, fused)


def test_candidates_offer_library_and_fused(monkeypatch):
    c = autotune.pt_gemm_candidates(4096, 3072, 3072, "fp8", True)
    assert any(x.library for x in c) and any(not x.library for x in c)
    assert not any(x.library for x in autotune.pt_gemm_candidates(4096, 3072, 3072, "fp8", False))
    # The GPU lists (the interpreter has its own): checked here without a GPU.
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    for cap in ((9, 0), (10, 0)):
        # int8 on wgmma GPUs: only the library GEMM (the fused int32 loop is serialised there)
        assert all(x.library for x in autotune.pt_gemm_candidates(4096, 3072, 3072, "int8", True, cap))
    ampere = autotune.pt_gemm_candidates(4096, 3072, 3072, "int8", True, (8, 0))
    assert ampere[0].library and any(not x.library for x in ampere)  # mma.sync pipelines int32 fine
    hopper_fp8 = autotune.pt_gemm_candidates(4096, 3072, 3072, "fp8", True, (9, 0))
    assert not hopper_fp8[0].library and any(x.library for x in hopper_fp8)
    ada = autotune.pt_gemm_candidates(4096, 3072, 3072, "fp8", False, (8, 9))
    assert all(c.block_m * c.block_n <= 128 * 64 for c in ada)  # mma.sync: no 128x128 (spills)


def test_int8_library_pads_small_m():
    """_int_mm needs M > 16 on CUDA: small M runs on 17 appended zero rows, sliced back (exact)."""
    from svdq_compile.codegen.library_per_token import library_product

    g = torch.Generator().manual_seed(1)
    for m in (1, 16, 17):
        qa = torch.randint(-128, 128, (m, 64), generator=g, dtype=torch.int8)
        w8 = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
        acc = library_product(qa, w8, "int8")
        assert acc.shape == (m, 24) and torch.equal(acc, qa.int() @ w8.int().t())


# ------------------------------------------------------------------ ops, options
def test_through_svdq_linear_op():
    b, t, n = 2, 5, 72
    a = _args(_input(b * t, K).reshape(b, t, K), _layer("fp8", n, K), "fp8", epilogue="relu")
    with triton_on_cpu():
        y = torch.ops.svdq.linear(*a)
    assert y.shape == (b, t, n) and rel_err(y, _reference(a)) < _tol("fp8")


def test_through_triton_op():
    from svdq_compile.codegen import op

    if op.triton_linear is None:
        pytest.skip("torch.library.triton_op unavailable")
    a = _args(_input(9, K), _layer("int8", 72, K), "int8", epilogue="silu")
    y = torch.ops.svdq.triton_linear(*a)
    assert torch.equal(y, quantized_linear_triton(a))
    assert rel_err(y, _reference(a)) < _tol("int8")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_keep_expanded(scheme, monkeypatch):
    monkeypatch.setenv(KEEP_ENV, "1")
    lay = _layer(scheme, 72, K, rank=0)
    a = _args(_input(17, K), lay, scheme)
    y1 = quantized_linear_triton(a)
    assert getattr(lay["qweight"], PT_CACHE_ATTR, None) is not None
    assert torch.equal(quantized_linear_triton(a), y1)
    lay["qweight"].mul_(-1)  # in-place write: the cached copy must be rebuilt
    y3 = quantized_linear_triton(a)
    assert rel_err(y3, _reference(a)) < _tol(scheme) and not torch.equal(y3, y1)


# ------------------------------------------------------------------ errors and fallback
def test_bad_inputs_raise():
    lay = _layer("fp8", 72, K)
    a = _args(_input(3, K), lay, "fp8")
    with pytest.raises(TypeError, match="input dtype"):
        quantized_linear_triton(a._replace(x=a.x.to(torch.int32)))
    with pytest.raises(ValueError, match="wchannel"):
        quantized_linear_triton(a._replace(wchannel=None))
    with pytest.raises(TypeError, match="floating group scales"):
        quantized_linear_triton(a._replace(wscales=a.wscales.to(torch.int8)))
    with pytest.raises(ValueError, match="wzeros"):
        quantized_linear_triton(_args(a.x, _layer("int8", 72, K), "int8")._replace(wzeros=None))


@pytest.mark.parametrize("failure", ["launch", "autotune"])
def test_kernel_failure_falls_back_logged_once(failure, monkeypatch, caplog):
    monkeypatch.setattr(fallback, "quantized_linear_cpu", quantized_linear_cpu)
    if failure == "launch":
        def broken(*a, **k):
            raise RuntimeError("simulated compile failure")
        monkeypatch.setattr(ptl, "run_gemm_pt", broken)
    else:
        def no_config(kind, *a, **k):
            raise AutotuneError(f"svdq autotune: every {kind} config failed")
        monkeypatch.setattr("svdq_compile.codegen.gemm_per_token.choose_config", no_config)
    a = _args(_input(17, K), _layer("int8", 72, K), "int8", epilogue="gelu")
    with caplog.at_level(logging.DEBUG, logger="svdq_compile.codegen.fallback"):
        y1 = quantized_linear_triton(a)
        y2 = quantized_linear_triton(a)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "torch path" in warnings[0].getMessage()
    assert torch.equal(y1, quantized_linear_cpu(a)) and torch.equal(y2, y1)


def test_autotune_every_config_failing_raises_autotune_error(monkeypatch):
    monkeypatch.setattr(autotune, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(autotune, "_MEMO", {})

    def bench(cfg):
        raise RuntimeError("out of shared memory")

    spec = KernelSpec(act_bits=8, scheme="fp8")
    cands = [PtGemmConfig(64, 64, 128, 1, 4, 3), PtGemmConfig(128, 128, 128, 8, 8, 4)]
    with pytest.raises(AutotuneError, match="every gemm_pt config failed"):
        autotune.choose_config("gemm_pt", spec, 999, 72, K, cands, bench, torch.device("cpu"))


def test_run_or_fallback_serves_the_group_scheme_too(monkeypatch, caplog):
    """The same safety net for the group GEMM's "every gemm config failed" (AutotuneError)."""
    monkeypatch.setattr(fallback, "quantized_linear_cpu", quantized_linear_cpu)
    from tests.codegen.codegen_helpers import make_input, make_layer

    layer = make_layer(72, K, rank=8)
    a = LinearArgs(make_input(5, K), *layer.args(), None, None, 64, 4, 4, False, 0.0, "none")
    spec = KernelSpec(rank=8, has_smooth=True, has_bias=True, in_dtype=torch.float32, out_dtype=torch.float32)
    calls = []

    def failing():
        calls.append(1)
        raise AutotuneError("svdq autotune: every gemm config failed for ... m4096")

    with caplog.at_level(logging.WARNING, logger="svdq_compile.codegen.fallback"):
        y = fallback.run_or_fallback(a, spec, failing)
        y2 = fallback.run_or_fallback(a, spec, failing)
    assert len(calls) == 1 and len(caplog.records) == 1  # the failing spec is not retried
    assert torch.equal(y, quantized_linear_cpu(a)) and torch.equal(y2, y)
