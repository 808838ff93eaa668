"""KernelSpec, autotune bookkeeping and the tuned-config cache (no kernel launches)."""
import json

import pytest
import torch

pytest.importorskip("triton")

from svdq_compile.codegen.autotune import GemmConfig, choose_config, m_bucket  # noqa: E402
from svdq_compile.codegen.cache import TuneCache, make_key  # noqa: E402
from svdq_compile.codegen.gemm import broadcast_operand  # noqa: E402
from svdq_compile.codegen.spec import KernelSpec, rank_pad  # noqa: E402


def test_spec_validation_and_key():
    s = KernelSpec(rank=32, epilogue="gelu", has_bias=True)
    assert s.mode == "w4a4" and s.has_lora and s.rank_pad == 32 and s.act_code == 1
    assert s.supports_triton() is None
    assert s.key() != s.without_lora().key()
    assert s.key() == KernelSpec(rank=32, epilogue="gelu", has_bias=True).key()
    with pytest.raises(ValueError):
        KernelSpec(epilogue="tanh")
    with pytest.raises(ValueError):
        KernelSpec(act_bits=8, act_unsigned=True)
    with pytest.raises(TypeError):
        KernelSpec(in_dtype=torch.int8)
    assert KernelSpec(act_bits=16).supports_triton() is not None
    assert KernelSpec(group_size=48).supports_triton() is not None


@pytest.mark.parametrize("r,p", [(0, 16), (1, 16), (16, 16), (17, 32), (32, 32), (33, 64)])
def test_rank_pad(r, p):
    assert rank_pad(r) == p


def test_m_bucket():
    assert [m_bucket(m) for m in (1, 16, 17, 1000, 4608)] == [16, 16, 32, 1024, 8192]


def test_tune_cache_roundtrip(tmp_path):
    c = TuneCache(tmp_path)
    key = make_key("gemm", "spec", 1024, 3072, 3072, "GPU")
    assert c.get(key) is None
    c.put(key, {"block_m": 128})
    assert json.loads(c.path.read_text())[key] == {"block_m": 128}
    assert TuneCache(tmp_path).get(key) == {"block_m": 128}  # a new process reads the file
    c.path.write_text("{not json")
    assert TuneCache(tmp_path).get(key) is None  # corrupt file: re-tune, no crash


def test_choose_config_without_bench_uses_default():
    cands = [GemmConfig(64, 64, 1, 4, 4), GemmConfig(128, 128, 8, 8, 4)]
    got = choose_config("gemm", KernelSpec(), 1024, 256, 256, cands, None, torch.device("cpu"))
    assert got == cands[0]


def test_broadcast_operand_views_without_copy():
    n = 5
    # [B, 1, N] gate for [B, T, K] input: read in place with a zero row stride.
    gate = torch.randn(2, 1, n)
    v, t, sb, st, sn = broadcast_operand(gate, (2, 3), n)
    assert v.data_ptr() == gate.data_ptr() and (t, sb, st, sn) == (3, n, 0, 1)
    # [N] bias-like residual: one row for every token.
    r = torch.randn(n)
    v, t, sb, st, sn = broadcast_operand(r, (2, 3), n)
    assert v.data_ptr() == r.data_ptr() and st == 0 and sb == 0
    # Full [M, N] residual.
    full = torch.randn(2, 3, n)
    v, t, sb, st, sn = broadcast_operand(full, (2, 3), n)
    assert (t, sb, st, sn) == (6, 0, n, 1)
    # Check the addressing formula against expand() for every case.
    for src in (gate, r, full, torch.randn(1, 3, n)):
        v, t, sb, st, sn = broadcast_operand(src, (2, 3), n)
        flat = src.expand(2, 3, n).reshape(6, n)
        for m in range(6):
            for j in range(n):
                off = (m // t) * sb + (m % t) * st + j * sn
                val = torch.as_strided(v, (1,), (1,), v.storage_offset() + off)[0]
                assert val == flat[m, j]


def test_concurrent_first_calls_tune_once_and_agree(monkeypatch, tmp_path):
    # Thread safety of the tuned-config caches: threads whose first call hits the same
    # cold shape must benchmark it once and all get that choice (no torn cache file).
    import threading
    import time

    import triton.testing

    from svdq_compile.codegen import autotune, cache

    monkeypatch.setattr(cache, "_CACHE", cache.TuneCache(tmp_path))
    monkeypatch.setattr(autotune, "_MEMO", {})
    monkeypatch.setattr(autotune, "_tuning_enabled", lambda: True)
    cands = [GemmConfig(64, 64, 1, 4, 4), GemmConfig(128, 128, 8, 8, 4), GemmConfig(64, 128, 8, 4, 3)]
    fastest = cands[2]
    calls: list = []
    lock = threading.Lock()

    def bench(cfg):
        with lock:
            calls.append(cfg)
        time.sleep(0.01)  # long enough for the other threads to arrive mid-tuning

    # do_bench's timing is replaced by a fixed "fastest" answer so the test is exact.
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 0.1 if calls[-1] == fastest else 1.0)[1])
    n_threads = 6
    barrier = threading.Barrier(n_threads)
    got: list = [None] * n_threads

    def work(i):
        barrier.wait()
        got[i] = choose_config("gemm", KernelSpec(), 1000, 256, 256, cands, bench, torch.device("cpu"))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [fastest] * n_threads
    # Each candidate: one warm-up launch + one timed call, by one thread only.
    assert len(calls) == 2 * len(cands)
    entries = json.loads(cache.tune_cache().path.read_text())
    assert list(entries.values()) == [{"block_m": 64, "block_n": 128, "group_m": 8, "num_warps": 4, "num_stages": 3}]
