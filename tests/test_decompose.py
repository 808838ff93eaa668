"""Pure SVDQuant numerics: smoothing, low rank, residual quantization."""
import torch

from svdq_compile.quant.decompose import LayerTarget, decompose_layer, low_rank, search_candidates, smoothing_factors


def _weight(n=192, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A few large singular directions plus noise: the spectrum of real weights.
    return (torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)) * 0.3 + torch.randn(n, k, generator=g) * 0.05


def test_low_rank_exact_matches_svd():
    w = _weight()
    up, down = low_rank(w, 16, exact=True)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    torch.testing.assert_close(up @ down, best, rtol=1e-8, atol=1e-8)


def test_randomized_low_rank_same_error():
    w = _weight()
    e_exact = (w.double() - (lambda a: a[0] @ a[1])(low_rank(w, 16, exact=True))).norm()
    e_rand = (w.double() - (lambda a: a[0] @ a[1])(low_rank(w, 16, exact=False))).norm()
    # Randomized SVD (4 power iterations) is within 2% of the optimal truncation error even
    # on this adversarial spectrum (8 strong directions, then flat noise inside the rank).
    assert abs(e_rand - e_exact) / e_exact < 2e-2


def test_reconstruction_within_quantization_bound():
    w = _weight()
    p = decompose_layer(w, None, None, LayerTarget(rank=16))
    w_hat = p.effective_weight().double()
    res_scale = p.wscales.double().repeat_interleave(64, dim=1)
    assert ((w.double() - w_hat).abs() <= res_scale / 2 + 1e-4).all()


def test_refinement_never_worse_and_smoothing_roundtrip():
    w = _weight()
    lam = torch.rand(256) + 0.5
    e0 = decompose_layer(w, None, lam, LayerTarget(rank=16, refine_iters=0)).meta["weight_error"]
    e3 = decompose_layer(w, None, lam, LayerTarget(rank=16, refine_iters=3)).meta["weight_error"]
    assert e3 <= e0
    p = decompose_layer(w, None, lam, LayerTarget(rank=16))
    # effective_weight undoes lambda: it approximates the original W
    assert ((p.effective_weight() - w).norm() / w.norm()) < 0.1


def test_smoothing_degenerate_channels():
    x = torch.tensor([0.0, 2.0, 4.0])
    w = torch.tensor([1.0, 0.0, 2.0])
    lam = smoothing_factors(x, w, 0.5, 0.5)
    assert lam[0] == 1.0 and lam[1] == 1.0  # zero channels: no division blow-up
    assert torch.isclose(lam[2], torch.tensor(2.0 ** 0.5))


def test_search_candidates():
    c = search_candidates(20)
    assert c[0] == (0.0, 0.0) and len(c) == 39
    assert (0.05, 0.0) in c and (0.5, 0.5) in c and (0.95, 0.05) in c


def test_warm_started_low_rank_matches_exact_error():
    # The refinement rounds re-decompose W' - Q(R): a small move of the matrix. A block
    # power iteration started from the previous factors must reach the exact error.
    w = _weight(n=320, k=384)
    _, down = low_rank(w, 16, exact=True)
    g = torch.Generator().manual_seed(3)
    w2 = w + torch.randn(w.shape, generator=g) * 0.01  # ~ an INT4 residual's rounding noise
    e_exact = (w2.double() - (lambda a: a[0] @ a[1])(low_rank(w2, 16, exact=True))).norm()
    e_warm = (w2.double() - (lambda a: a[0] @ a[1])(low_rank(w2, 16, init=down, niter=2))).norm()
    # 0.1%: the truncation error is flat near the optimum, a nearly converged subspace
    # is within a hair of it; a wrong subspace would be off by the signal (tens of %).
    assert abs(e_warm - e_exact) / e_exact < 1e-3


def test_fast_paths_keep_decomposition_quality(monkeypatch):
    # Large layers refine with warm starts and search with randomized SVD; forcing the
    # fast paths on a small layer must give the exact path's weight error (within 1%).
    from svdq_compile.quant import decompose

    w = _weight(n=192, k=256)
    lam = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5
    t = LayerTarget(rank=16, refine_iters=2)
    exact = decompose_layer(w, None, lam, t).meta["weight_error"]
    monkeypatch.setattr(decompose, "_FAST_SVD_MIN_DIM", 0)
    warm = decompose_layer(w, None, lam, t).meta["weight_error"]
    fast = decompose_layer(w, None, lam, t, fast=True).meta["weight_error"]
    # 1%: refinement converges to the same fixed point from either start; the search's
    # one-power-iteration SVD only needs to rank candidates, within a few % is enough.
    assert abs(warm - exact) / exact < 1e-2
    assert abs(fast - exact) / exact < 5e-2


def test_warm_start_stays_on_the_weights_device():
    # Calibration runs where the weights are (CUDA on a GPU); "meta" stands in for a
    # non-CPU device here: the seeded random directions must follow the weights.
    w = torch.randn(64, 96, device="meta")
    up, down = low_rank(w, 8, init=torch.randn(8, 96, device="meta"), niter=1)
    assert up.device.type == "meta" and down.shape == (8, 96)
