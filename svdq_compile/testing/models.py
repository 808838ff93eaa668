"""Small seeded models shared by the tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttnMLPBlock(nn.Module):
    """LayerNorm -> Q, K, V (+ out) and LayerNorm -> GELU MLP: the shape of a DiT block."""

    def __init__(self, dim: int = 256, hidden: int = 512, outlier_frac: float = 0.01, outlier_scale: float = 30.0,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)  # tiny: stays in float (min_features)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() == 2 else 0.01))
            # Real DiTs have a few activation channels ~30x larger than the rest (the
            # outliers SVDQuant targets): put them in the norms' affine weights.
            n_out = max(1, int(dim * outlier_frac))
            idx = torch.randperm(dim, generator=g)[:n_out]
            for norm in (self.norm1, self.norm2):
                norm.weight.fill_(1.0)
                norm.weight[idx] = outlier_scale
                norm.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, t, d = q.shape
        att = F.scaled_dot_product_attention(q.view(b, t, 4, d // 4).transpose(1, 2),
                                             k.view(b, t, 4, d // 4).transpose(1, 2),
                                             v.view(b, t, 4, d // 4).transpose(1, 2))
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + self.head(x).mean(-1, keepdim=True)
