"""ARM64 NEON kernels (runtime/cpu_kernels/neon/) against the same torch oracle, bit for bit.

The kernels are not a torch extension yet: a standalone harness (harness_neon.cpp) is built
with the Debian aarch64 cross compiler (``g++-aarch64-linux-gnu``) and run under
``qemu-aarch64`` (package ``qemu-user``), twice: with the dot-product extension (SDOT) and for
plain ARMv8.0 (SMULL/SADALP widening). On an ARM64 host it runs natively with the host
compiler. The cases mirror test_cpu_isa.py's: row counts 1/17/33/130, N tails, G = 64/128 and
G == K, int4 and int8 weights, the low-rank/bias epilogue, the fused quantizer (h included)
and the W4A16 GEMV.
"""
from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.runtime.test_cpu_isa import GEMM_CASES, _data, gemm_oracle, gemv_oracle, lora_down_oracle

from svdq_compile.runtime.packing import pack_int4
from svdq_compile.runtime.quantize import qrange, quantize_activation, quantize_weight

SRC = Path(__file__).resolve().parents[2] / "runtime" / "cpu_kernels" / "neon" / "harness_neon.cpp"
NATIVE = platform.machine().lower() in ("aarch64", "arm64")


def _toolchain():
    """(compiler, runner prefix) or a skip reason."""
    if NATIVE:
        cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
        return (cxx, []) if cxx else "no C++ compiler on this ARM64 host"
    cxx = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    missing = [name for name, path in (("aarch64-linux-gnu-g++ (apt: g++-aarch64-linux-gnu)", cxx),
                                       ("qemu-aarch64 (apt: qemu-user)", qemu)) if path is None]
    if missing:
        return "NEON harness needs " + " and ".join(missing)
    # -cpu max: every extension qemu emulates (dotprod included)
    return cxx, [qemu, "-cpu", "max"]


@pytest.fixture(scope="module", params=["dotprod", "armv8.0"])
def harness(request, tmp_path_factory):
    tc = _toolchain()
    if isinstance(tc, str):
        pytest.skip(tc)
    cxx, runner = tc
    march = "armv8.2-a+dotprod" if request.param == "dotprod" else "armv8-a"
    exe = tmp_path_factory.mktemp("neon") / f"harness_{request.param}"
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", f"-march={march}", "-o", str(exe), str(SRC)]
    if not NATIVE:
        cmd.insert(1, "-static")  # no aarch64 sysroot needed at run time
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return runner + [str(exe)], request.param


def _header(*vals):
    v = list(vals) + [0] * (16 - len(vals))
    return struct.pack("<16q", *v)


def _b(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _run(harness, payload: bytes, tmp_path: Path) -> bytes:
    cmd, variant = harness
    cin, cout = tmp_path / "cases.bin", tmp_path / "out.bin"
    cin.write_bytes(payload)
    out = subprocess.run(cmd + [str(cin), str(cout)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"dotprod={1 if variant == 'dotprod' else 0}" in out.stdout, out.stdout
    return cout.read_bytes()


def _take(buf: bytes, pos: int, n: int, dtype) -> tuple[torch.Tensor, int]:
    size = n * np.dtype(dtype).itemsize
    return torch.from_numpy(np.frombuffer(buf[pos:pos + size], dtype=dtype).copy()), pos + size


def test_neon_gemm_bit_exact(harness, tmp_path):
    payload, refs = b"", []
    gen = torch.Generator().manual_seed(11)
    for idx, (m, n, k, g, act, wbits) in enumerate(GEMM_CASES):
        qa, sa, qw, sw = _data(m, n, k, g, act, wbits, seed=m + n + k)
        epi = idx % 2 == 0  # every other case with the low-rank / bias epilogue
        r = 6
        h, lu, bias = torch.randn(m, r, generator=gen), torch.randn(n, r, generator=gen), torch.randn(n, generator=gen)
        lu[: n // 2, 3:] = 0  # some rank columns all zero within a 64-column panel
        payload += _header(1, m, n, k, g, r, int(epi), int(epi))
        payload += _b(qa) + _b(sa) + _b(qw) + _b(sw) + ((_b(h) + _b(lu) + _b(bias)) if epi else b"")
        refs.append(gemm_oracle(qa, sa, qw, sw, g, *((h, lu, bias) if epi else ())))
    out, pos = _run(harness, payload, tmp_path), 0
    for case, ref in zip(GEMM_CASES, refs):
        y, pos = _take(out, pos, ref.numel(), np.float32)
        assert torch.equal(y.view_as(ref), ref), (harness[1], case)
    # extremes: -128 / 127 operands, largest partials (G == K == 3072)
    payload, refs = b"", []
    for a_val, w_val in [(-128, -128), (127, -128), (-128, 127), (127, 127)]:
        qa = torch.full((5, 3072), a_val, dtype=torch.int8)
        qw = torch.full((9, 3072), w_val, dtype=torch.int8)
        sa, sw = torch.rand(5, 1) + 0.5, torch.rand(9, 1) + 0.5
        payload += _header(1, 5, 9, 3072, 3072, 0, 0, 0) + _b(qa) + _b(sa) + _b(qw) + _b(sw)
        refs.append(gemm_oracle(qa, sa, qw, sw, 3072))
    out, pos = _run(harness, payload, tmp_path), 0
    for ref in refs:
        y, pos = _take(out, pos, ref.numel(), np.float32)
        assert torch.equal(y.view_as(ref), ref), harness[1]


def test_neon_quantizer_bit_exact(harness, tmp_path):
    gen = torch.Generator().manual_seed(0)
    cases = [(17, 192, 64, 4, False, 0.0), (5, 320, 320, 8, False, 0.0), (3, 3072, 3072, 8, False, 0.0),
             (130, 96, 32, 4, True, 0.171875), (2, 40, 8, 4, False, 0.25)]
    payload, refs = b"", []
    for m, k, g, bits, unsigned, shift in cases:
        x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
        x[0, :g] = 0  # all-zero group: scale 1
        smooth = torch.rand(k, generator=gen) + 0.5
        ld = torch.randn(5, k, generator=gen)
        qmin, qmax = qrange(bits, unsigned)
        shift_bits = struct.unpack("<i", struct.pack("<f", shift))[0]
        payload += _header(2, m, k, g, qmin, qmax, int(unsigned), 1, 5, shift_bits) + _b(x) + _b(smooth) + _b(ld)
        xs = x / smooth
        q, s = quantize_activation(xs, bits, g, unsigned=unsigned, shift=shift)
        refs.append((q, s, lora_down_oracle(xs, ld)))
    out, pos = _run(harness, payload, tmp_path), 0
    for case, (q_ref, s_ref, h_ref) in zip(cases, refs):
        q, pos = _take(out, pos, q_ref.numel(), np.int8)
        s, pos = _take(out, pos, s_ref.numel(), np.float32)
        h, pos = _take(out, pos, h_ref.numel(), np.float32)
        assert torch.equal(q.view_as(q_ref), q_ref), (harness[1], case)
        assert torch.equal(s.view_as(s_ref), s_ref), (harness[1], case)
        assert torch.equal(h.view_as(h_ref), h_ref), (harness[1], case)


def test_neon_w4a16_bit_exact(harness, tmp_path):
    gen = torch.Generator().manual_seed(3)
    cases = [(1, 40, 256, 64), (3, 17, 320, 32), (5, 64, 256, 128)]
    payload, refs = b"", []
    for m, n, k, group in cases:
        qi, s = quantize_weight(torch.randn(n, k, generator=gen), 4, group)
        qw = pack_int4(qi)
        x = torch.randn(m, k, generator=gen)
        payload += _header(3, m, n, k, group) + _b(x) + _b(qw) + _b(s.float())
        refs.append(gemv_oracle(x, qw, s, group))
    out, pos = _run(harness, payload, tmp_path), 0
    for case, ref in zip(cases, refs):
        y, pos = _take(out, pos, ref.numel(), np.float32)
        assert torch.equal(y.view_as(ref), ref), (harness[1], case)
