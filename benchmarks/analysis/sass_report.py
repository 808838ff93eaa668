"""Static structure of the GPU GEMM kernels, compiled offline (no GPU needed).

Triton compiles for any CUDA target without a device (``triton.compile`` with a
``GPUTarget``; ptxas and cuobjdump ship in the triton wheel), so the shape of the main
loop can be checked on a CPU machine: registers and spills, shared memory, which MMA
instructions each ``tl.dot`` became and on which operand type (below), the
wgmma waits with ``pendings = 0`` inside the main loop (the tensor cores idle until the
result is back), whether ptxas serialised the wgmmas anyway (its ``C7514``/``C7515``
notes), barriers and shared-memory stores per kernel.

SASS mnemonics, read off cuobjdump for a minimal ``tl.dot`` loop per architecture (Triton
3.9; ``mma_ops`` records the full mnemonic with shape and types), by operand type:

- bf16/fp16: ``HMMA.16816.F32[.BF16]`` (mma.sync, sm_80/86/89/120),
  ``HGMMA.64xNx16.F32[.BF16]`` (wgmma, sm_90), ``UTCHMMA`` (tcgen05, sm_100);
- int8: ``IMMA.16832.S8.S8``, ``IGMMA.64xNx32.S8.S8``, ``UTCIMMA``;
- fp8: ``QMMA.16832.F32.E4M3.E4M3`` (sm_89 and sm_120; sm_80/86 have no FP8),
  ``QGMMA.64xNx32.F32.E4M3.E4M3``, ``UTCQMMA``.

These are instruction counts of one binary, not timings: they say *why* a kernel may be
slow, never how fast it is (docs/kernels.md). Timings come from ``benchmarks/gpu_run.sh``.

    python -m benchmarks.analysis.sass_report [--arch 90] [--out benchmarks/analysis/results]
    python -m benchmarks.analysis.sass_report --compat   # sm_80 ... sm_120: does it compile

Kernels: the library's grouped GEMM (``codegen/gemm.py``: W4A4, W4A8, W8A8 at the Hopper
launch configs), with Triton's default lowering and with ``DISABLE_MMA_V3=1`` (Triton reads
it per compilation); the per-token kernels of ``w4a8-fp8`` / ``w4a8-int8``
(``codegen/gemm_per_token.py`` at every large-M autotune candidate and the few-token default,
``codegen/prologue_per_token.py`` and ``codegen/expand_weight.py`` at their defaults). For the
per-token GEMM the acceptance of issue 16 reads off ``main_loop_waits_pendings`` (no 0: an
MMA stays in flight), ``ptxas_serialization_codes`` (empty) and ``stack_bytes`` /
``spill_store_bytes`` (0). Results: ``benchmarks/analysis/results/sass_*_triton-<version>.json``;
run it once per Triton release (the GPU machine's and the dev venv's).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import inspect
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["compile_offline", "divisibility_attrs", "gemm_report", "main", "mma_summary", "main_loop_waits"]

# One FLUX linear (M = 4608 tokens, K = N = 3072): Triton specialises integer arguments
# divisible by 16 (and equal to 1), which decides vector widths, so the offline compile
# must see the same values a real launch passes.
_SHAPE = dict(M=4608, N=3072, K=3072)

_OP_RE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
# The whole mnemonic, shape and types included ("QGMMA.64x128x32.F32.E4M3.E4M3").
_FULL_OP_RE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")
# Tensor-core instructions by family; the first letter (after UTC) is the operand type.
_WGMMA = ("HGMMA", "IGMMA", "QGMMA")  # Hopper wgmma: 16-bit/tf32, int8, fp8
_MMA_SYNC = ("HMMA", "IMMA", "QMMA")  # mma.sync: 16-bit/tf32, int8, fp8 (sm_89, sm_120)
_KIND = {"H": "16-bit", "I": "int8", "Q": "fp8"}
_DEFAULT_OUT = str(Path(__file__).resolve().parent / "results")


def mma_summary(sass: str) -> dict:
    """Tensor-core instructions of a SASS listing: family counts, operand kinds and the
    full mnemonics (the table in the module docstring)."""
    full = collections.Counter(m.group(1) for m in _FULL_OP_RE.finditer(sass))
    wgmma = mma_sync = tc05 = 0
    kinds: collections.Counter = collections.Counter()
    mma_ops = {}
    for op, c in full.items():
        base = op.split(".")[0]
        if base in _WGMMA:
            wgmma += c
        elif base in _MMA_SYNC:
            mma_sync += c
        elif base.startswith("UTC") and base.endswith("MMA"):  # Blackwell tcgen05 (UTCHMMA, UTCQMMA, ...)
            tc05 += c
        else:
            continue
        mma_ops[op] = c
        letter = base[3] if base.startswith("UTC") else base[0]
        kind = _KIND.get(letter, base)
        if kind == "16-bit":
            kind = "bf16" if ".BF16" in op else "tf32" if ".TF32" in op else "fp16" if "MMA." in op else kind
        kinds[kind] += c
    return {
        "mma": "tcgen05" if tc05 else "wgmma" if wgmma else "mma.sync" if mma_sync else "none",
        "mma_kind": "+".join(k for k, _ in kinds.most_common()) or "none",
        "wgmma": wgmma, "mma_sync": mma_sync, "tcgen05_mma": tc05,
        "mma_by_kind": dict(kinds.most_common()), "mma_ops": dict(sorted(mma_ops.items())),
    }


def main_loop_waits(ttgir: str) -> list[int]:
    """``pendings`` of every wgmma wait inside a loop that issues a wgmma (innermost
    ``scf.for`` around the wait), from Triton's TTGIR. A 0 there means the loop waits for
    its own dot to complete every iteration (no MMA in flight); the wait after the loop is
    not counted."""
    loops: list[dict] = []
    open_loops: list[tuple[int, int]] = []  # (brace depth before the loop, index in loops)
    depth = 0
    for line in ttgir.splitlines():
        code = line.split(" loc(")[0]
        if "scf.for" in code and code.rstrip().endswith("{"):
            loops.append({"dots": 0, "waits": []})
            open_loops.append((depth, len(loops) - 1))
        if open_loops:
            cur = loops[open_loops[-1][1]]
            w = re.search(r"warp_group_dot_wait\b.*\{pendings = (\d+)", code)
            if w:
                cur["waits"].append(int(w.group(1)))
            elif re.search(r"ttng\.warp_group_dot\b", code):
                cur["dots"] += 1
        depth += code.count("{") - code.count("}")
        while open_loops and depth <= open_loops[-1][0]:
            open_loops.pop()
    return [p for lp in loops if lp["dots"] for p in lp["waits"]]


def _bin_dir() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (releases pick different binaries)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    return str(getattr(tool, "path", tool))


def divisibility_attrs(sig: dict[str, str], ints: dict[str, int]) -> dict:
    """The ``tt.divisibility`` hints a launch would give: pointers (16-byte aligned) and the
    integer arguments whose launch value is a nonzero multiple of 16."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(sig)
            if sig[p].startswith("*") or (sig[p] == "i32" and ints.get(p, 0) % 16 == 0 and ints.get(p, 0))}


def compile_offline(fn: Any, ints: dict[str, int], ptr_types: dict[str, str], constexprs: dict[str, Any], *,
                    arch: int, num_warps: int, num_stages: int, disable_mma_v3: bool = False) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` and summarise its SASS (see the module docstring).

    ints: value of every integer argument (specialisation as at launch); ptr_types: Triton
    type of every pointer argument; constexprs: every constexpr argument.
    """
    if not hasattr(fn, "cache_key"):  # an InterpretedFunction: TRITON_INTERPRET=1 at import
        raise RuntimeError("offline compilation needs the compiled kernels: unset TRITON_INTERPRET "
                           "(the kernels were decorated for the CPU interpreter)")
    sig: dict[str, str] = {}
    const = dict(constexprs)
    for p in inspect.signature(fn.fn).parameters:
        if p in const:
            sig[p] = "constexpr"
        elif p in ptr_types:
            sig[p] = ptr_types[p]
        elif ints.get(p) == 1:  # launches specialise 1 as a constant
            sig[p] = "constexpr"
            const[p] = 1
        else:
            sig[p] = "i32"
    attrs = divisibility_attrs(sig, ints)
    old = os.environ.get("DISABLE_MMA_V3")
    try:
        if disable_mma_v3:
            os.environ["DISABLE_MMA_V3"] = "1"
        else:
            os.environ.pop("DISABLE_MMA_V3", None)
        # Triton's own ptxas run, verbose (-v is always on; the knob prints its log): the
        # notes and spills of exactly this cubin. always_compile: a cache hit runs no ptxas.
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        if old is None:
            os.environ.pop("DISABLE_MMA_V3", None)
        else:
            os.environ["DISABLE_MMA_V3"] = old
    return _summarise(k, num_warps, log.getvalue())


def _summarise(k: Any, num_warps: int, ptxas_log: str = "") -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        sass = subprocess.run([str(_bin_dir() / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([str(_bin_dir() / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                             text=True, check=True).stdout
        # ptxas's verbose log: its "info (C75xx)" lines say when it gave up on the wgmma
        # pipeline (C7514/C7515 "wgmma.mma_async instructions are serialized ..."). Triton's own
        # run when compile_offline captured it (same flags as the cubin: Triton 3.9 adds
        # --regAllocOptLevel=2, which changes register allocation), else ptxas again on the PTX.
        if "Used" in ptxas_log:
            log_ok, log = True, ptxas_log
        else:
            arch = int(k.metadata.target.arch)
            ptx = Path(d) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            pv = subprocess.run([_ptxas(arch), "-v", f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", str(ptx),
                                 "-o", str(Path(d) / "v.cubin")], capture_output=True, text=True)
            log_ok, log = pv.returncode == 0, pv.stdout + pv.stderr
    ptxas_notes = sorted({m.group(0) for m in re.finditer(r"\(C75\d\d\)[^\n]*", log)})
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    # Overlap, statically: the most float FMAs/converts issued between a wgmma and the wait
    # that retires it (0: the tensor cores idle while the rescale runs).
    overlap, run, open_wgmma = 0, 0, False
    for m in _OP_RE.finditer(sass):
        op = m.group(1)
        if op.startswith(("IGMMA", "HGMMA", "QGMMA")):
            open_wgmma, run = True, 0
        elif op.startswith("WARPGROUP.DEPBAR"):
            open_wgmma = False
        elif open_wgmma and op.split(".")[0] in ("FFMA", "FMUL", "FADD", "I2F", "I2FP"):
            run += 1
            overlap = max(overlap, run)
    ops = collections.Counter(m.group(1).split(".")[0] for m in _OP_RE.finditer(sass))
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    smem = int(k.metadata.shared)
    # 64K registers and 228 KB of shared memory per SM (Hopper): resident CTAs per SM.
    ctas = min(65536 // (regs * 32 * num_warps), (228 * 1024) // max(smem, 1))
    waits = [int(x) for x in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", k.asm["ttgir"])]
    loop_waits = main_loop_waits(k.asm["ttgir"])
    serial = sorted({c for n in ptxas_notes if "serializ" in n for c in re.findall(r"C75\d\d", n)})
    return {
        "registers": regs, "stack_bytes": stack, "shared_bytes": smem, "ctas_per_sm": ctas,
        **mma_summary(sass),
        "wgmma_waits_pendings": waits,  # every wait in the kernel, in TTGIR order
        "main_loop_waits_pendings": loop_waits,  # those inside the loop that issues the wgmmas
        "main_loop_wait0": sum(1 for p in loop_waits if p == 0),  # 0: an MMA stays in flight
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
        "barriers": ops["BAR"], "shared_stores": ops["STS"], "shared_loads": ops["LDS"] + ops["LDSM"],
        "byte_permutes": ops["PRMT"], "ffma": ops["FFMA"], "sass_instructions": sum(ops.values()),
        "ptxas_verbose_ok": log_ok,  # False: the ptxas fields below say nothing
        "ptxas_wgmma_serialized": bool(serial),
        "ptxas_serialization_codes": serial,  # C7514 (reading acc.), C7515 (defining acc.), ...
        "float_ops_under_wgmma": overlap,
        "ptxas_notes": ptxas_notes,
    }


def gemm_report(wbits: int, abits: int, block_m: int, block_n: int, warps: int, stages: int, *, arch: int,
                disable_mma_v3: bool) -> dict:
    """The library's grouped GEMM (codegen/gemm.py) with its launch-time constexprs."""
    import torch

    from svdq_compile.codegen.gemm import _constexprs, gemm_kernel
    from svdq_compile.codegen.spec import KernelSpec

    spec = KernelSpec(weight_bits=wbits, act_bits=abits, act_unsigned=False, group_size=64, rank=32,
                      epilogue="none", has_smooth=True, has_bias=True, has_gate=False, has_residual=False,
                      in_dtype=torch.bfloat16, out_dtype=torch.bfloat16, lora_precision="tf32")
    const = dict(_constexprs(spec), BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8)
    m, n, k = _SHAPE["M"], _SHAPE["N"], _SHAPE["K"]
    ints = dict(M=m, N=n, K=k, R=32, stride_qam=k // 2 if abits == 4 else k, stride_sam=1, stride_sag=m,
                stride_qwn=k // 2 if wbits == 4 else k, stride_swn=k // 64, stride_hm=32, stride_lun=32,
                stride_lur=1, gate_t=m, stride_gb=0, stride_gt=0, stride_gn=0, res_t=m, stride_rb=0,
                stride_rt=0, stride_rn=0, stride_ym=n)
    ptrs = dict(qa_ptr="*i8", sa_ptr="*fp32", qw_ptr="*i8", sw_ptr="*fp16", h_ptr="*fp32", lu_ptr="*bf16",
                bias_ptr="*bf16", gate_ptr="*bf16", res_ptr="*bf16", y_ptr="*bf16")
    return compile_offline(gemm_kernel, ints, ptrs, const, arch=arch, num_warps=warps, num_stages=stages,
                           disable_mma_v3=disable_mma_v3)


def w4a16_report(block_m: int, block_n: int, *, arch: int, x_type: str = "*bf16") -> dict:
    """The weight-only INT4 kernel of the AdaLN layers (codegen/w4a16.py), its GPU launch shape."""
    from svdq_compile.codegen.w4a16 import w4a16_kernel

    m, n, k = 2, 18432, 3072  # FLUX's AdaLN modulation: one row per sample
    ints = dict(M=m, N=n, K=k, stride_xm=k, stride_xk=1, stride_qn=k // 2, stride_sn=k // 64)
    ptrs = dict(x_ptr=x_type, qw_ptr="*i8", sw_ptr="*fp16", y_ptr="*fp32")
    const = dict(GROUP=64, IEEE=x_type == "*fp32", BLOCK_M=block_m, BLOCK_N=block_n)
    return compile_offline(w4a16_kernel, ints, ptrs, const, arch=arch, num_warps=4, num_stages=3)


def prologue_report(block_m: int, warps: int, stages: int, *, arch: int, shift_type: str = "fp32") -> dict:
    """The library's prologue (codegen/prologue.py): smoothing, INT4 quantization, X' L2^T."""
    import torch

    from svdq_compile.codegen.prologue import _constexprs, prologue_kernel
    from svdq_compile.codegen.spec import KernelSpec

    spec = KernelSpec(weight_bits=4, act_bits=4, act_unsigned=False, group_size=64, rank=32, epilogue="none",
                      has_smooth=True, has_bias=True, has_gate=False, has_residual=False,
                      in_dtype=torch.bfloat16, out_dtype=torch.bfloat16, lora_precision="tf32")
    m, k = _SHAPE["M"], _SHAPE["K"]
    ints = dict(M=m, K=k, R=32, stride_xm=k, stride_xk=1, stride_ldr=k, stride_ldk=1, stride_qm=k // 2,
                stride_sg=m, stride_hm=32)
    ptrs = dict(x_ptr="*bf16", smooth_ptr="*bf16", ld_ptr="*bf16", qa_ptr="*i8", sa_ptr="*fp32", h_ptr="*fp32",
                shift=shift_type)
    return compile_offline(prologue_kernel, ints, ptrs, dict(_constexprs(spec), BLOCK_M=block_m), arch=arch,
                           num_warps=warps, num_stages=stages)


def _pt_spec(scheme: str) -> Any:
    """The per-token linear of a FLUX block as the GPU path builds it: smoothing, rank 32,
    bias, bf16 in and out, the GPU default low-rank precision (``tf32x3``)."""
    import torch

    from svdq_compile.codegen.spec import KernelSpec

    return KernelSpec(weight_bits=4, act_bits=8, act_unsigned=False, group_size=64, rank=32, epilogue="none",
                      has_smooth=True, has_bias=True, has_gate=False, has_residual=False, in_dtype=torch.bfloat16,
                      out_dtype=torch.bfloat16, lora_precision="tf32x3", scheme=scheme)


def _q8(scheme: str) -> str:
    return "*fp8e4nv" if scheme == "fp8" else "*i8"


def gemm_pt_report(scheme: str, cfg: Any, *, arch: int, shape: Optional[dict] = None) -> dict:
    """The per-token GEMM (codegen/gemm_per_token.py: 8-bit x 8-bit, one accumulator over K, rescale,
    low-rank up projection and epilogue after the loop) at one ``PtGemmConfig``."""
    from svdq_compile.codegen.gemm_per_token import _constexprs, gemm_pt_kernel

    spec = _pt_spec(scheme)
    sh = dict(shape or _SHAPE)
    m, n, k = sh["M"], sh["N"], sh["K"]
    const = dict(_constexprs(spec), FROM_ACC=False, EVEN_K=k % cfg.block_k == 0, BLOCK_M=cfg.block_m,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    ints = dict(M=m, N=n, K=k, R=32, stride_am=k, stride_bn=k, stride_accm=0, stride_hm=32, stride_lun=32,
                stride_lur=1, gate_t=m, stride_gb=0, stride_gt=0, stride_gn=0, res_t=m, stride_rb=0,
                stride_rt=0, stride_rn=0, stride_ym=n)
    ptrs = dict(a_ptr=_q8(scheme), sa_ptr="*fp32", b_ptr=_q8(scheme), c_ptr="*fp32",
                acc_ptr="*i32" if scheme == "int8" else "*fp32", h_ptr="*fp32", lu_ptr="*bf16", bias_ptr="*bf16",
                gate_ptr="*bf16", res_ptr="*bf16", y_ptr="*bf16")
    return compile_offline(gemm_pt_kernel, ints, ptrs, const, arch=arch, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)


def prologue_pt_report(scheme: str, cfg: Any, *, arch: int) -> dict:
    """The per-token prologue (codegen/prologue_per_token.py): smoothing, row absmax, X' L2^T, then
    the 8-bit activations, at one ``PrologueConfig``."""
    from svdq_compile.codegen.prologue_per_token import _constexprs, prologue_pt_kernel

    spec = _pt_spec(scheme)
    m, k = _SHAPE["M"], _SHAPE["K"]
    const = dict(_constexprs(spec, False), EVEN_K=k % 64 == 0, BLOCK_M=cfg.block_m)
    ints = dict(M=m, K=k, R=32, stride_xm=k, stride_xk=1, stride_ldr=k, stride_ldk=1, stride_qm=k, stride_hm=32)
    ptrs = dict(x_ptr="*bf16", smooth_ptr="*bf16", ld_ptr="*bf16", qa_ptr=_q8(scheme), sa_ptr="*fp32",
                h_ptr="*fp32")
    return compile_offline(prologue_pt_kernel, ints, ptrs, const, arch=arch, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)


def expand_report(scheme: str, *, arch: int, block_n: int = 16, block_k: int = 256, warps: int = 4) -> dict:
    """The INT4 -> 8-bit weight expansion pass (codegen/expand_weight.py) at its GPU launch."""
    from svdq_compile.codegen.expand_weight import expand_kernel

    n, k = _SHAPE["N"], _SHAPE["K"]
    int8 = scheme == "int8"
    ints = dict(N=n, K=k, stride_qn=k // 2, stride_sn=k // 64, stride_zn=k // 64, stride_on=k)
    ptrs = dict(qw_ptr="*i8", s_ptr="*i8" if int8 else "*fp16", z_ptr="*i8" if int8 else "*fp16", c_ptr="*fp32",
                out_ptr=_q8(scheme))
    const = dict(INT8=int8, SOFT_FP8=False, GROUP=64, BLOCK_N=block_n, BLOCK_K=block_k)
    return compile_offline(expand_kernel, ints, ptrs, const, arch=arch, num_warps=warps, num_stages=1)


_SMALL_M = 64  # the per-token GEMM's few-token configs (autotune: m <= 64)


def _pt_configs(m: int = _SHAPE["M"], arch: int = 90) -> tuple[list, list]:
    """(GEMM configs, prologue configs) the GPU autotuner tries for the per-token kernels at
    ``m`` tokens on ``sm_<arch>``, the first of each being its default."""
    from svdq_compile.codegen import autotune

    kw = {}
    if "capability" in inspect.signature(autotune.pt_gemm_candidates).parameters:  # per-architecture lists
        kw["capability"] = (arch // 10, arch % 10)
    fused = [c for c in autotune.pt_gemm_candidates(m, _SHAPE["N"], _SHAPE["K"], "fp8", False, **kw)
             if not c.library]
    return fused, list(autotune._GPU_PROLOGUE)


def pt_available() -> Optional[str]:
    """None when the per-token kernels (codegen/gemm_per_token.py, prologue_per_token.py, expand_weight.py)
    can be imported, else why not."""
    try:
        import svdq_compile.codegen.expand_weight  # noqa: F401
        import svdq_compile.codegen.gemm_per_token  # noqa: F401
        import svdq_compile.codegen.prologue_per_token  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def pt_rows(arch: int, progress: Optional[Callable[[str], None]] = None, *, all_configs: bool = True) -> list[dict]:
    """Every per-token kernel at its default config (GEMM: every large-M candidate with
    ``all_configs``), both schemes."""
    gemm_cfgs, pro_cfgs = _pt_configs(arch=arch)
    rows = []
    for scheme in ("fp8", "int8"):
        for i, cfg in enumerate(gemm_cfgs if all_configs else gemm_cfgs[:1]):
            name = (f"gemm_pt {scheme} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} warps={cfg.num_warps} "
                    f"stages={cfg.num_stages}" + (" (default)" if i == 0 else ""))
            rows.append({"kernel": name, "lowering": "default", **gemm_pt_report(scheme, cfg, arch=arch)})
            if progress:
                progress(name)
        cfg = _pt_configs(_SMALL_M, arch)[0][0]
        name = (f"gemm_pt {scheme} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} warps={cfg.num_warps} "
                f"stages={cfg.num_stages} (default for M <= {_SMALL_M}; compiled at M = {_SMALL_M})")
        rows.append({"kernel": name, "lowering": "default",
                     **gemm_pt_report(scheme, cfg, arch=arch, shape=dict(_SHAPE, M=_SMALL_M))})
        if progress:
            progress(name)
        cfg = pro_cfgs[0]
        name = f"prologue_pt {scheme} block_m={cfg.block_m} warps={cfg.num_warps} stages={cfg.num_stages} (default)"
        rows.append({"kernel": name, "lowering": "default", **prologue_pt_report(scheme, cfg, arch=arch)})
        name = f"expand_weight {scheme} 16x256 warps=4"
        rows.append({"kernel": name, "lowering": "default", **expand_report(scheme, arch=arch)})
        if progress:
            progress(name)
    return rows


@triton.jit
def dot_probe_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, y_ptr, M, N, K, INT_ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The smallest per-token GEMM: A [M, K] x W [N, K] (both K-contiguous, 8- or 16-bit),
    one accumulator over all of K, then the per-token x per-channel rescale. It pins down
    which SASS instruction each operand type becomes (``probe_report``, ``--mnemonics``) and
    that sass_report counts it; not used by the library."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, out_dtype=tl.int32 if INT_ACC else tl.float32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc.to(tl.float32) * tl.load(sa_ptr + rm)[:, None] * tl.load(sw_ptr + rn)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


def probe_report(dtype: str, *, arch: int, block: tuple[int, int, int] = (128, 128, 128), num_warps: int = 8,
                 num_stages: int = 3) -> dict:
    """``dot_probe_kernel`` for one operand type (Triton's names: ``fp8e4nv``, ``fp8e5``,
    ``bf16``, ``fp16``, ``i8``) at the FLUX linear shape."""
    bm, bn, bk = block
    ptrs = dict(a_ptr=f"*{dtype}", w_ptr=f"*{dtype}", sa_ptr="*fp32", sw_ptr="*fp32", y_ptr="*bf16")
    const = dict(INT_ACC=dtype == "i8", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return compile_offline(dot_probe_kernel, dict(_SHAPE), ptrs, const, arch=arch, num_warps=num_warps,
                           num_stages=num_stages)


def mnemonics(archs: tuple[int, ...] = (80, 89, 90, 100, 120)) -> list[dict]:
    """The tensor-core instruction each operand type's ``tl.dot`` becomes per architecture
    (the table of the module docstring)."""
    rows = []
    for arch in archs:
        for dt in ("fp8e4nv", "bf16", "fp16", "i8"):
            try:
                r = probe_report(dt, arch=arch)
                rows.append({"arch": f"sm_{arch}", "dtype": dt, "mma": r["mma"], "mma_kind": r["mma_kind"],
                             "mma_ops": r["mma_ops"]})
            except Exception as e:  # noqa: BLE001 - e.g. no FP8 before sm_89
                rows.append({"arch": f"sm_{arch}", "dtype": dt, "error": f"{type(e).__name__}: {' '.join(str(e).split())[-160:]}"})
    return rows


GEMM_CASES = [(4, 4, 128, 128, 8, 4), (4, 4, 128, 64, 4, 4), (4, 8, 128, 64, 4, 4), (8, 8, 128, 64, 4, 4)]


def run_all(arch: int, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    rows = []
    for mma2 in (False, True):
        lowering = "DISABLE_MMA_V3=1" if mma2 else "default"
        for wb, ab, bm, bn, w, s in GEMM_CASES:
            name = f"gemm w{wb}a{ab} {bm}x{bn} warps={w} stages={s}"
            rows.append({"kernel": name, "lowering": lowering,
                         **gemm_report(wb, ab, bm, bn, w, s, arch=arch, disable_mma_v3=mma2)})
            if progress:
                progress(f"{name} [{lowering}]")
    if pt_available() is None:
        rows += pt_rows(arch, progress)
    return rows


COMPAT_ARCHS = (80, 86, 89, 90, 100, 120)  # A100, RTX 30xx, RTX 40xx/L40, H100/H200, B200, RTX 50xx


def compat(out: str) -> int:
    """Compile the W4A4 GEMM (128x128, 8 warps), the prologue (fp32 and fp64 shift) and the
    W4A16 kernel (bf16 and fp32 activations) for every architecture of COMPAT_ARCHS."""
    rows = []
    for arch in COMPAT_ARCHS:
        try:
            r = {"arch": f"sm_{arch}", "compiles": True, **gemm_report(4, 4, 128, 128, 8, 3, arch=arch,
                                                                       disable_mma_v3=False)}
            r["prologue_registers"] = prologue_report(32, 4, 2, arch=arch)["registers"]
            # Inductor passes Python floats to user kernels as fp64 (pytorch#190340): the
            # prologue must compile with an fp64 shift too.
            r["prologue_fp64_shift_registers"] = prologue_report(32, 4, 2, arch=arch, shift_type="fp64")["registers"]
            r["w4a16_registers"] = w4a16_report(16, 64, arch=arch)["registers"]
            r["w4a16_fp32_registers"] = w4a16_report(16, 64, arch=arch, x_type="*fp32")["registers"]
        except Exception as e:  # noqa: BLE001 - a failing architecture is the finding
            r = {"arch": f"sm_{arch}", "compiles": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if pt_available() is None:
            r["per_token"] = pt_compat(arch)
        rows.append(r)
        print(f"sm_{arch}: " + (f"compiles, {r['mma']}, {r['registers']} registers, {r['stack_bytes']} B stack"
                                if r["compiles"] else f"FAILS: {r['error']}"), flush=True)
        for name, b in r.get("per_token", {}).items():
            if not isinstance(b, dict):
                print(f"    {name}: {b}")
                continue
            print(f"    {name:16s} " + (f"{b['mma']:8s} {b['mma_kind']:10s} {b['registers']:3d} registers, "
                                         f"{b['stack_bytes']} B stack, main-loop waits {b['main_loop_waits_pendings']}, "
                                         f"serialised {b['ptxas_serialization_codes']}"
                                         if b["compiles"] else f"FAILS: {b['error'][-150:]}"), flush=True)
    info = {"what": "offline compile of the W4A4 GEMM, the prologue and the W4A16 kernel per architecture, and "
                    "of the per-token kernels (gemm_pt, prologue_pt, expand_weight) at their default configs "
                    "(static, not run); FP8 needs sm_89 or newer",
            "triton": triton.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    os.makedirs(out, exist_ok=True)
    path = Path(out) / f"sass_compat_triton-{triton.__version__}.json"
    path.write_text(json.dumps(info, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["compiles"] for r in rows) else 1


_BRIEF = ("mma", "mma_kind", "mma_ops", "registers", "stack_bytes", "spill_store_bytes", "shared_bytes",
          "main_loop_waits_pendings", "ptxas_serialization_codes")


def pt_compat(arch: int) -> dict:
    """The per-token kernels at their default configs for one architecture (the GEMM's
    default for that architecture where the autotuner has per-architecture lists): a short
    summary each, or the error (FP8 does not exist before sm_89)."""
    gemm_cfgs, pro_cfgs = _pt_configs(arch=arch)
    g = gemm_cfgs[0]
    out = {"gemm_pt default config": f"{g.block_m}x{g.block_n}x{g.block_k}, {g.num_warps} warps, {g.num_stages} stages"}
    for scheme in ("fp8", "int8"):
        for name, fn in ((f"gemm_pt {scheme}", lambda: gemm_pt_report(scheme, g, arch=arch)),
                         (f"prologue_pt {scheme}", lambda: prologue_pt_report(scheme, pro_cfgs[0], arch=arch)),
                         (f"expand {scheme}", lambda: expand_report(scheme, arch=arch))):
            try:
                r = fn()
                out[name] = {"compiles": True, **{k: r[k] for k in _BRIEF}}
            except Exception as e:  # noqa: BLE001 - a failing architecture is the finding
                out[name] = {"compiles": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    ap.add_argument("--compat", action="store_true",
                    help="only check that the GPU kernels compile for sm_80/86/89/90/100/120")
    ap.add_argument("--mnemonics", action="store_true",
                    help="only print which SASS MMA instruction each operand type's tl.dot becomes per architecture")
    ap.add_argument("--out", default=_DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.mnemonics:
        for r in mnemonics():
            print(f"{r['arch']:7s} {r['dtype']:8s} " + (f"{r['mma']:9s} {r['mma_kind']:6s} {r['mma_ops']}"
                                                       if "error" not in r else r["error"]))
        return 0
    if args.compat:
        return compat(args.out)
    rows = run_all(args.arch, progress=lambda s: print("compiled", s, file=sys.stderr, flush=True))
    why = pt_available()
    info = {"what": "offline compile, static SASS counts (not timings)", "arch": f"sm_{args.arch}",
            "per_token_kernels": "included" if why is None else f"not available: {why}",
            "triton": triton.__version__, "shape_mnk": [_SHAPE["M"], _SHAPE["N"], _SHAPE["K"]],
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"sass_sm{args.arch}_triton-{triton.__version__}.json"
    path.write_text(json.dumps(info, indent=1))
    cols = ("registers", "stack_bytes", "ctas_per_sm", "mma", "mma_kind", "wgmma", "mma_sync",
            "main_loop_waits_pendings", "ptxas_serialization_codes", "barriers", "shared_stores")
    print(f"sm_{args.arch}, Triton {triton.__version__}, M/N/K = 4608/3072/3072")
    print(f"{'kernel':60s} {'lowering':17s} " + " ".join(f"{c:>10s}" for c in cols))
    for r in rows:
        print(f"{r['kernel'][:60]:60s} {r['lowering']:17s} " + " ".join(f"{str(r[c]):>10s}" for c in cols))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
