"""Small seeded models for the export tests (and a factory for the CLI test)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import svdq_compile
from svdq_compile import SVDQLinear, SVDQuantConfig
from svdq_compile.runtime import LinearSpec, PackedLinear, pack_int4, quantize_weight

# The brief's test config: small layers quantized, a coarse alpha search (fast).
TEST_CONFIG = SVDQuantConfig(min_features=32, search_grid=4)


class NormMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (the second linear reads GELU: unsigned INT4)."""

    def __init__(self, dim: int = 64, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 0.02))
            self.norm.weight.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def quantized_norm_mlp() -> NormMLP:
    model = NormMLP().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 16, 64, generator=g),) for _ in range(2)]
    svdq_compile.quantize(model, calib[0], calib, config=TEST_CONFIG, progress=False)
    return model


def packed_linear(k: int, n: int, *, group: int = 64, wbits: int = 4, abits: int = 4, unsigned: bool = False,
                  shift: float = 0.0, rank: int = 8, smooth: bool = True, bias: bool = True,
                  seed: int = 0) -> SVDQLinear:
    """An SVDQLinear with seeded random tensors (no calibration: instant)."""
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.1, wbits, group)
    p = PackedLinear(
        LinearSpec(k, n, group, wbits, abits, unsigned, shift, rank),
        pack_int4(q) if wbits == 4 else q, s,
        smooth=torch.rand(k, generator=g) + 0.5 if smooth else None,
        lora_down=torch.randn(rank, k, generator=g) * 0.1 if rank else None,
        lora_up=torch.randn(n, rank, generator=g) * 0.1 if rank else None,
        bias=torch.randn(n, generator=g) * 0.1 if bias else None,
    )
    return SVDQLinear(p, name=f"l{seed}")


class Variants(nn.Module):
    """One layer per corner of the op: modes, unsigned+shift, missing optional tensors,
    a module called twice (shared weights), group 32 and an odd output width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = packed_linear(128, 192, seed=1)  # w4a4 signed, smooth + low-rank + bias
        self.b = packed_linear(192, 64, unsigned=True, shift=0.171875, smooth=False, seed=2)  # after GELU
        self.c = packed_linear(64, 64, wbits=8, abits=8, rank=0, seed=3)  # w8a8, no low-rank
        self.d = packed_linear(64, 64, abits=16, bias=False, seed=4)  # w4a16 (weight-only)
        self.e = packed_linear(64, 33, group=32, abits=8, seed=5)  # w4a8, group 32, odd N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(F.gelu(self.a(x)))
        h = self.c(self.d(self.c(h)))
        return self.e(h)


def variants_for_cli():
    """CLI factory: (model, example_inputs, dynamic_shapes)."""
    return Variants().eval(), (torch.randn(2, 5, 128),), ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)


def tiny_flux():
    """The brief's tiny FluxTransformer2DModel, seeded."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
        ).eval()


def flux_inputs(batch: int, tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(tokens, dtype=torch.float32)
    return {
        "hidden_states": torch.randn(batch, tokens, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 1, 64, generator=g),
        "pooled_projections": torch.randn(batch, 64, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": torch.stack([torch.zeros(tokens), t // 4, t % 4], dim=-1),
        "txt_ids": torch.zeros(1, 3),
    }


class FluxCall(nn.Module):
    """Keyword inputs in, the output tensor out (return_dict=False)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, return_dict=False)[0]


def quantized_flux() -> FluxCall:
    model = FluxCall(tiny_flux()).eval()
    calib = [flux_inputs(2, 16, seed=s) for s in range(2)]
    svdq_compile.quantize(model, (), calib, config=TEST_CONFIG, example_kwargs=calib[0], progress=False)
    return model


def int8_linear(k: int, n: int, *, group: int = 64, rank: int = 8, smooth: bool = True, bias: bool = True,
                seed: int = 0) -> SVDQLinear:
    """A w4a8-int8 SVDQLinear (QServe progressive weights) with seeded random tensors."""
    from svdq_compile.runtime.per_token import quantize_weight_progressive

    g = torch.Generator().manual_seed(seed)
    pw = quantize_weight_progressive(torch.randn(n, k, generator=g) * 0.1, group)
    p = PackedLinear(
        LinearSpec(k, n, group, 4, 8, False, 0.0, rank, scheme="int8"), pw.qweight, pw.wscales,
        smooth=torch.rand(k, generator=g) + 0.5 if smooth else None,
        lora_down=torch.randn(rank, k, generator=g) * 0.1 if rank else None,
        lora_up=torch.randn(n, rank, generator=g) * 0.1 if rank else None,
        bias=torch.randn(n, generator=g) * 0.1 if bias else None,
        wzeros=pw.wzeros, wchannel=pw.wchannel,
    )
    return SVDQLinear(p, name=f"i{seed}")


class Int8Block(nn.Module):
    """q/k/v-like siblings on one input (shared smoothing), a GELU MLP, all w4a8-int8, plus a
    W4A4 and a W4A16 layer: the deploy flavour's cases in one small model."""

    def __init__(self, dim: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = int8_linear(dim, dim, seed=11)
        self.k = int8_linear(dim, dim, seed=12)
        self.k.smooth = self.q.smooth  # siblings share one smoothing vector (as quantize() makes them)
        self.fc1 = int8_linear(dim, hidden, seed=13)
        self.fc2 = int8_linear(hidden, dim, rank=0, seed=14)
        self.w4a4 = packed_linear(dim, dim, seed=15)
        self.w4a16 = packed_linear(dim, dim, abits=16, seed=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.q(h) * torch.sigmoid(self.k(h))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.w4a16(self.w4a4(h))


class QMLPBlock(nn.Module):
    """LayerNorm -> q + GELU MLP, 512 wide (MLP 2048): the block of issue 25's file sizes
    (4.73 MB of bf16 parameters). ``fc2`` reads GELU (unsigned INT4 in the group modes)."""

    def __init__(self, dim: int = 512, hidden: int = 2048, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() == 2 else 0.02))
            self.norm.weight.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.q(h) + self.fc2(F.gelu(self.fc1(h)))


def quantized_qmlp_block(mode: str) -> QMLPBlock:
    """QMLPBlock quantized in ``mode`` at the default rank 32, fixed alpha, no refinement (the export
    is under test, not the search: a few seconds per mode on 2 cores)."""
    import dataclasses

    model = QMLPBlock().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 16, 512, generator=g),) for _ in range(2)]
    config = dataclasses.replace(TEST_CONFIG, mode=mode, alpha=0.5, refine_iters=0)
    svdq_compile.quantize(model, calib[0], calib, config=config, progress=False)
    return model


def qmlp_input(batch: int = 2, tokens: int = 16, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, tokens, 512, generator=torch.Generator().manual_seed(seed))
