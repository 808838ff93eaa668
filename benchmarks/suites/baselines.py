"""The methods every suite compares: eager, Inductor, torchao, bitsandbytes and ours.

Each ``build_*`` takes a float module (already on the device, in the baseline dtype) and
returns a module to call, or raises :class:`Unavailable` with the reason it cannot run
here (reported as ``n/a (reason)``, never dropped). Builders never modify their input.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["Unavailable", "Method", "METHODS", "METHOD_BY_KEY", "PRIORITY", "MIN_TIME_LEFT_S", "OURS_MODES",
           "BUILDERS", "wrap",
           "ours_mode", "ours_modes_for", "reason", "package_versions", "bench_svdq_config", "build_ours_quantized"]

log = logging.getLogger(__name__)

# Modes of our backend compared in every suite.
OURS_MODES = ("w4a4", "w4a8-int8", "w4a8-fp8", "w4a8", "w8a8")


class Unavailable(Exception):
    """A baseline that cannot run in this environment; the message is the reason."""


@dataclass(frozen=True)
class Method:
    """One column of the result tables."""

    name: str  # column label, e.g. "torchao int8 (W8A8)"
    key: str  # stable id used in JSON and --methods, e.g. "torchao_int8"
    backend: Optional[str]  # None: called as is; "inductor" / "svdquant": torch.compile(backend=...)
    doc: str


_OURS_DOC = ("svdq_compile.quantize(mode={m!r}) (module swap), then "
             "torch.compile(backend='svdquant', options={{'use_inductor': True}})")
METHODS = (
    Method("eager", "eager", None, "the float model as is (fp32 on CPU, bf16 on GPU)"),
    Method("inductor", "inductor", "inductor", "torch.compile(model) (Inductor, default mode)"),
    Method("torchao int8 (W8A8)", "torchao_int8", "inductor",
           "torchao quantize_(Int8DynamicActivationInt8WeightConfig()) + torch.compile; AdaLN modulation "
           "linears (M = batch) stay float (torch._int_mm needs M > 16 on CUDA)"),
    Method("torchao int4 (W4A16)", "torchao_int4", "inductor",
           "torchao quantize_(Int4WeightOnlyConfig(group_size=64, tile_packed_to_4d)) in bf16 + torch.compile"),
    Method("bnb NF4 (W4A16)", "bnb_nf4", None, "bitsandbytes Linear4bit(quant_type='nf4', bf16 compute), eager"),
    Method("ours W4A4", "ours_w4a4", "svdquant", _OURS_DOC.format(m="w4a4")),
    Method("ours W4A4 no-compile", "ours_w4a4_eager", None,
           "the same quantized module called eagerly (SVDQLinear -> svdq::linear, no Inductor)"),
    Method("ours W4A8-INT8 (per token)", "ours_w4a8-int8", "svdquant", _OURS_DOC.format(m="w4a8-int8")),
    Method("ours W4A8-FP8 (per token)", "ours_w4a8-fp8", "svdquant", _OURS_DOC.format(m="w4a8-fp8")),
    Method("ours W4A8 (g64)", "ours_w4a8", "svdquant", _OURS_DOC.format(m="w4a8")),
    Method("ours W8A8", "ours_w8a8", "svdquant", _OURS_DOC.format(m="w8a8")),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}
# Build order when a time budget may cut a case short: the comparisons that matter most first.
PRIORITY = ("eager", "ours_w4a4", "ours_w4a8-int8", "ours_w4a8-fp8", "inductor", "ours_w4a4_eager",
            "torchao_int8", "bnb_nf4", "ours_w4a8", "ours_w8a8", "torchao_int4")
# Seconds of suite budget a method needs left to be started in the block/model suites
# (torchao int4 + Inductor took 104 s to compile one FLUX double block on an H200).
MIN_TIME_LEFT_S = {"torchao_int4": 120.0}


def wrap(method: Method, module: Any) -> Any:
    """The callable a method is timed with (compiled lazily: the first call compiles)."""
    if method.backend is None:
        return module
    if method.backend == "svdquant":
        return torch.compile(module, backend="svdquant", options={"use_inductor": True})
    return torch.compile(module, backend=method.backend)


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions (package metadata: nothing is imported, so reporting them has no side
    effects; e.g. importing torchao defines Triton kernels, after which the Triton interpreter
    of the kernels suite's CPU smoke run no longer works)."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for name, dist in (("svdq_compile", "svdq-compile"), ("diffusers", "diffusers"), ("torchao", "torchao"),
                       ("bitsandbytes", "bitsandbytes"), ("triton", "triton"), ("numpy", "numpy")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return out


def _short(e: BaseException, limit: int = 90) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = f"{type(e).__name__}: {msg}" if not isinstance(e, Unavailable) else msg
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def reason(e: BaseException) -> str:
    """The short 'why' of an n/a entry."""
    return _short(e)


# ---------------------------------------------------------------------------------------
# Float baselines
# ---------------------------------------------------------------------------------------
def build_eager(model: nn.Module, **_: Any) -> nn.Module:
    return model


def build_inductor(model: nn.Module, **_: Any) -> nn.Module:
    return model  # compiled by the harness (Method.compiled)


# ---------------------------------------------------------------------------------------
# torchao
# ---------------------------------------------------------------------------------------
def _torchao():
    if importlib.util.find_spec("torchao") is None:
        raise Unavailable("torchao not installed (pip install torchao)")
    with _quiet_torchao():
        try:
            import torchao.quantization as tq
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torchao import failed: {_short(e)}") from e
    return tq


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """No warnings while importing torchao: on a CPU torch it logs one for each CUDA-only
    extension it cannot load, and its import warns about deprecated torch APIs."""
    logs = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(logs, levels):
            lg.setLevel(level)


def _not_adaln(module: nn.Module, fqn: str) -> bool:
    """torchao filter: every nn.Linear except AdaLN modulation linears (``*norm*.linear``).

    Those run on one vector per sample (M = batch): torch._int_mm needs M > 16 on CUDA,
    and our default config keeps them weight-only too (W4A16).
    """
    return isinstance(module, nn.Linear) and not fnmatch.fnmatchcase(fqn, "*norm*.linear")


def build_torchao_int8(model: nn.Module, **_: Any) -> nn.Module:
    tq = _torchao()
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.quantize_(m, tq.Int8DynamicActivationInt8WeightConfig(), filter_fn=_not_adaln)
    return m


def build_torchao_int4(model: nn.Module, device: str = "cpu", **_: Any) -> nn.Module:
    tq = _torchao()
    if device != "cuda":
        # torchao 0.18 on CPU: the plain/preshuffled formats need the `mslk` kernels,
        # plain_int32 has no CPU kernel, tile_packed_to_4d needs CUDA.
        raise Unavailable("no CPU kernel for torchao int4 weight-only here: needs CUDA or mslk")
    m = copy.deepcopy(model).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = tq.Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")
        except TypeError:  # older torchao: no packing-format argument
            cfg = tq.Int4WeightOnlyConfig(group_size=64)
        tq.quantize_(m, cfg)
    return m


# ---------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------
def build_bnb_nf4(model: nn.Module, device: str = "cpu", **_: Any) -> nn.Module:
    if device != "cuda":
        raise Unavailable("bitsandbytes NF4 benchmarked on GPU only")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Unavailable("bitsandbytes not installed")
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"bitsandbytes import failed: {_short(e)}") from e
    m = copy.deepcopy(model)
    swaps = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            swaps.append((name, mod))
    if not swaps:
        raise Unavailable("no nn.Linear to replace")
    for name, mod in swaps:
        new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
        new.weight = bnb.nn.Params4bit(mod.weight.data.to("cpu", torch.bfloat16), requires_grad=False,
                                       quant_type="nf4")
        if mod.bias is not None:
            new.bias = nn.Parameter(mod.bias.data.to("cpu", torch.bfloat16), requires_grad=False)
        new = new.to(device)  # quantizes to NF4 on the move to the GPU
        if getattr(new.weight, "quant_state", None) is None:
            raise RuntimeError("bitsandbytes did not quantize the weight (no quant_state after .to(device))")
        if not name:  # the model is a bare nn.Linear
            return new
        parent_name, _, child = name.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        setattr(parent, child, new)
    return m


# ---------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------
def bench_svdq_config(mode: str, **overrides: Any):
    """Quantization settings of the speed benchmarks.

    Speed and bytes do not depend on the smoothing strength or the refinement, so the
    speed suites use a fixed alpha = 0.5 and no refinement to keep quantization time
    low; accuracy is the business of the ablation/demo benchmarks (full search).
    """
    from svdq_compile import SVDQuantConfig

    opts = dict(mode=mode, alpha=0.5, refine_iters=0, search_tokens=256, search_rows=256)
    opts.update(overrides)
    return SVDQuantConfig(**opts)


def build_ours_quantized(model: nn.Module, mode: str, example: Sequence[Any], calib: Iterable[Any],
                         example_kwargs: Optional[dict] = None, **cfg_overrides: Any) -> tuple[nn.Module, Any]:
    """A quantized copy (module swap, ``svdq_compile.quantize``) and its report."""
    import svdq_compile

    m = copy.deepcopy(model)
    report = svdq_compile.quantize(m, list(example), list(calib), bench_svdq_config(mode, **cfg_overrides),
                                   example_kwargs=example_kwargs, progress=False)
    if not report.rewritten:
        raise Unavailable("svdq_compile.quantize rewrote no linear layer")
    return m, report


BUILDERS: dict[str, Callable[..., Any]] = {
    "eager": build_eager,
    "inductor": build_inductor,
    "torchao_int8": build_torchao_int8,
    "torchao_int4": build_torchao_int4,
    "bnb_nf4": build_bnb_nf4,
}


def ours_modes_for(ctx: Any) -> tuple[str, ...]:
    """Our modes a block/model suite runs: on CPU W4A4 and W4A8-INT8 (what mode='auto'
    picks there) in --quick (all modes are in the linear suite; each extra mode costs a
    quantization and a compilation)."""
    if ctx.quick and ctx.device == "cpu" and not getattr(ctx, "smoke", False):
        ctx.note("--quick on CPU: ours W4A8-FP8 / W4A8 (g64) / W8A8 run in the linear suite only")
        return ("w4a4", "w4a8-int8")
    return OURS_MODES


def ours_mode(key: str) -> Optional[str]:
    """'ours_w4a4' / 'ours_w4a4_eager' -> 'w4a4'; None for the baselines."""
    if not key.startswith("ours_"):
        return None
    return key.split("_")[1]
