"""Shared builders for the graph-pass tests: a tiny seeded FLUX and graph capture."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

import svdq_compile
from svdq_compile.capture.backend import last_reports
from svdq_compile.passes.op_nodes import SVDQ_OP

# Eager graphs (no Inductor), a coarse alpha grid, and min_features low enough for the
# tiny model's 64-wide layers (the embedder x_embedder (K=4) and the final proj_out
# (N=4) still stay in float).
# mode w4a4: the pass tests check graph rewrites against the paper's numerics (unsigned INT4 after
# GELU, exact-equality margins tuned to 4-bit activations); per-token modes: tests/runtime/test_per_token.py.
FAST = dict(use_inductor=False, search_grid=4, min_features=32, refine_iters=1, mode="w4a4")
NO_PASSES = dict(fold_smoothing=False, fuse_siblings=False, fuse_epilogue=False)

TINY_FLUX = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                 pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**TINY_FLUX).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # seeded random weights everywhere (AdaLN-Zero inits some to 0)
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 0.05))
    return m


def flux_inputs(batch: int = 2, tokens: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, tokens, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 1, 64, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1).float(),
        txt_ids=torch.zeros(1, 3),
        return_dict=False,
    )


def svdq_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SVDQ_OP]


class Spy:
    """Backend wrapper recording each compiled graph (before/after) and its report."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.compiled: list = []
        self.inputs: list[str] = []
        # Each compilation's example inputs: the backend clears its own list once the first
        # variant is built (so it does not keep the first call's tensors alive).
        self.example_inputs: list[list] = []

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        self.inputs.append(str(gm.graph))
        self.example_inputs.append(list(example_inputs))
        c = svdq_compile.svdquant_backend(gm, example_inputs, options=self.options)
        self.compiled.append(c)
        return c

    @property
    def gm(self) -> fx.GraphModule:
        """The rewritten graph of the last compilation (after its first quantized call)."""
        fn = self.compiled[-1]._fn
        assert isinstance(fn, fx.GraphModule), "compiled with Inductor: no FX graph to inspect"
        return fn


def compile_run(model, inputs: dict, options: dict, calls: int = 1) -> tuple[Any, Spy]:
    spy = Spy(options)
    cm = torch.compile(model, backend=spy)
    out = None
    with torch.no_grad():
        for _ in range(calls):
            out = cm(**inputs)
    return out, spy


def report():
    return last_reports()[-1]


UNIT = dict(FAST, alpha=0.5, skip=(), mode_overrides={})  # fixed alpha: no search, fast


def outlier_input(shape, seed: int = 0, frac: float = 0.05, scale: float = 20.0) -> torch.Tensor:
    """Random activations with a few large channels (what smoothing is for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    idx = torch.randperm(shape[-1], generator=g)[: max(1, int(shape[-1] * frac))]
    x[..., idx] *= scale
    return x


def quantized_graph(model: torch.nn.Module, args: tuple, options: Optional[dict] = None):
    """(rewritten graph with no graph passes applied, its example inputs) for ``model(*args)``."""
    svdq_compile.calibrate(model, [args], progress=False)
    spy = Spy(dict(UNIT, **NO_PASSES, **(options or {})))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=spy)(*args)
    assert len(spy.compiled) == 1, "expected one graph (no graph breaks)"
    return spy.gm, spy.example_inputs[-1]


def run_gm(gm: fx.GraphModule, example_inputs) -> torch.Tensor:
    with torch.no_grad():
        out = gm(*example_inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
