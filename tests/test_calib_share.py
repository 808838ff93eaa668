"""Linears reading one tensor share calibration statistics, and leave the group exactly
when they stop reading it (calib_share.py)."""
import torch
import torch.nn as nn

from svdq_compile import SVDQuantConfig, calibrating
from svdq_compile.capture.calibration import LayerStats, stats_of

CFG = SVDQuantConfig(calib_tokens=48)  # small cap: later calls overwrite reservoir rows


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(64, 32)
        self.o = nn.Linear(32, 64)

    def forward(self, x, k_other=False, skip_v=False, inplace=False):
        h = x * 2
        q = self.q(h)
        if inplace:
            h.add_(1.0)  # same object, new contents: k must not share q's statistics
        k = self.k(h + 1 if k_other else h)
        v = 0 if skip_v else self.v(h)
        return self.o(q + k + v)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 20, 64, generator=g) for _ in range(n)]


def _standalone(xs, seed):
    st = LayerStats(64, CFG.calib_tokens, seed=seed)
    for x in xs:
        st.update(x)
    return st


def _same(a: LayerStats, b: LayerStats) -> None:
    assert a.seen == b.seen and a.calls == b.calls
    assert torch.equal(a.absmax, b.absmax) and torch.equal(a.minimum, b.minimum)
    assert torch.equal(a.sample, b.sample)


def _seed_of(m, name):
    return CFG.seed + [n for n, _ in m.named_modules()].index(name)


def test_siblings_share_one_reservoir():
    m = Attn()
    xs = _inputs(4)
    with torch.no_grad(), calibrating(m, CFG) as stats:
        for x in xs:
            m(x)
    assert stats["q"] is stats["k"] is stats["v"] and stats["o"] is not stats["q"]
    assert stats_of(m.k.weight) is stats["q"]  # the backend finds them on every weight
    # Exactly the statistics q alone would have recorded (leader's seed).
    _same(stats["q"], _standalone([2 * x for x in xs], _seed_of(m, "q")))
    assert len({id(s) for s in stats.values()}) == 2  # 4 reservoirs -> 2


def test_member_reading_another_tensor_leaves_with_exact_stats():
    m = Attn()
    xs = _inputs(4)
    with torch.no_grad(), calibrating(m, CFG) as stats:
        for i, x in enumerate(xs):
            m(x, k_other=(i == 2))
    assert stats["q"] is stats["v"] and stats["k"] is not stats["q"]
    h = [2 * x for x in xs]
    _same(stats["q"], _standalone(h, _seed_of(m, "q")))
    # k was in q's group for calls 0-1, then read h + 1 in call 2 and its own input after.
    k_inputs = [h[0], h[1], h[2] + 1, h[3]]
    _same(stats["k"], _standalone(k_inputs, _seed_of(m, "q")))


def test_member_skipped_in_a_call_keeps_its_own_history():
    m = Attn()
    xs = _inputs(3, seed=1)
    with torch.no_grad(), calibrating(m, CFG) as stats:
        m(xs[0])
        m(xs[1], skip_v=True)
        m(xs[2])
    h = [2 * x for x in xs]
    assert stats["q"] is stats["k"] and stats["v"] is not stats["q"]
    _same(stats["q"], _standalone(h, _seed_of(m, "q")))
    _same(stats["v"], _standalone([h[0], h[2]], _seed_of(m, "q")))


def test_in_place_change_between_reads_is_not_shared():
    m = Attn()
    xs = _inputs(2, seed=2)
    with torch.no_grad(), calibrating(m, CFG) as stats:
        for x in xs:
            m(x, inplace=True)
    assert stats["q"] is not stats["k"]
    _same(stats["k"], _standalone([2 * x + 1 for x in xs], _seed_of(m, "k")))


def test_bf16_activations_are_kept_in_bf16():
    st16, st32 = LayerStats(64, 32), LayerStats(64, 32)
    x = torch.randn(40, 64).bfloat16()
    st16.update(x)
    st32.update(x.float())
    assert st16.sample.dtype == torch.bfloat16 and torch.equal(st16.sample.float(), st32.sample)
    assert st16.nbytes() < 0.6 * st32.nbytes()  # reservoir at half size, fp32 absmax/min
    st16.update(torch.randn(40, 64))  # fp32 later on: the reservoir widens, nothing lost
    assert st16.sample.dtype == torch.float32 and st16.seen == 80


def test_random_schedules_match_per_linear_statistics():
    # Fuzz: 4 linears, each call every linear reads one of two shared tensors, a private
    # copy, or is skipped. Whatever the sharing did, each linear's statistics must equal
    # those of its own inputs (reservoir seeded like its group's first linear).
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.ls = nn.ModuleList(nn.Linear(64, 8) for _ in range(4))

        def forward(self, x, plan):
            a, b = x * 2, x - 1
            for lin, p in zip(self.ls, plan):
                if p == 0:
                    lin(a)
                elif p == 1:
                    lin(b)
                elif p == 2:
                    lin(a.clone())

    rng = torch.Generator().manual_seed(0)
    for trial in range(25):
        m = Router()
        seen: dict = {f"ls.{i}": [] for i in range(4)}
        hooks = [lin.register_forward_pre_hook(lambda mod, args, n=f"ls.{i}": seen[n].append(args[0].clone()))
                 for i, lin in enumerate(m.ls)]
        # First call mostly shared so groups form; later calls random.
        plans = [[0, 0, 0, 1]] + [torch.randint(0, 4, (4,), generator=rng).tolist() for _ in range(4)]
        with torch.no_grad(), calibrating(m, CFG) as stats:
            for x, plan in zip(_inputs(len(plans), seed=trial), plans):
                m(x, plan)
        for h in hooks:
            h.remove()
        for name, xs in seen.items():
            st = stats[name]
            if not xs:
                assert st.seen == 0
                continue
            _same(st, _standalone(xs, _seed_of(m, st.name)))


class _Wide(nn.Module):
    """q/k/v wide enough for the backend to quantize (in_features a multiple of 64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128)
        self.o = nn.Linear(128, 128)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, (128,))
        return self.o(self.q(h) * self.k(h) + self.v(h))


def test_backend_auto_calibration_shares_one_recorder_per_input():
    m = _Wide()
    cm = torch.compile(m, backend="svdquant", options={"use_inductor": False, "rank": 8, "search_grid": 2,
                                                       "calib_calls": 1})
    with torch.no_grad():
        cm(torch.randn(2, 16, 128))
    sq, sk, sv, so = (stats_of(l.weight) for l in (m.q, m.k, m.v, m.o))
    assert sq is sk is sv and so is not sq
    assert sq.seen == 32 and so.seen == 32


def test_inference_mode_calibration_shares_too():
    # Inference tensors have no version counter: sharing falls back to identity.
    m = Attn()
    xs = _inputs(3, seed=4)
    with calibrating(m, CFG) as stats:
        with torch.inference_mode():
            for x in xs[:2]:
                m(x)
        with torch.no_grad():  # later calls outside inference_mode update the same stats
            m(xs[2])
    assert stats["q"] is stats["k"] is stats["v"]
    assert not stats["q"].sample.is_inference()
    _same(stats["q"], _standalone([2 * x for x in xs], _seed_of(m, "q")))


def test_empty_batches_do_not_break_sharing():
    m = Attn()
    xs = _inputs(2, seed=5)
    with torch.no_grad(), calibrating(m, CFG) as stats:
        m(torch.randn(0, 20, 64))  # zero-size batch first: nothing recorded
        m(xs[0])
        m(torch.randn(0, 20, 64), skip_v=True)  # v leaves after an update that added nothing
        m(xs[1])
    h = [2 * x for x in xs]
    assert stats["q"] is stats["k"] and stats["v"] is not stats["q"]
    _same(stats["q"], _standalone(h, _seed_of(m, "q")))
    _same(stats["v"], _standalone(h, _seed_of(m, "q")))
