"""Distance features: Gaussian radial basis, smooth cutoff envelope, and a small radial MLP."""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianRBF(nn.Module):
    """exp(-(d - mu_k)^2 / (2 sigma^2)) on num centres evenly spaced over [0, r_cut]."""

    def __init__(self, r_cut: float, num: int = 32):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, r_cut, num), persistent=False)
        self.gamma = 0.5 / (r_cut / (num - 1)) ** 2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (d.unsqueeze(-1) - self.centers.to(d.dtype)) ** 2)


def cosine_envelope(d: torch.Tensor, r_cut: float) -> torch.Tensor:
    """0.5·(cos(pi d / r_cut) + 1): 1 at d = 0, goes to 0 with zero slope at r_cut (smooth in r)."""
    return 0.5 * (torch.cos(d * (math.pi / r_cut)) + 1.0) * (d < r_cut)


class RadialMLP(nn.Module):
    """rbf -> hidden -> out with SiLU: per-edge invariant weights (radial scaling, gates)."""

    def __init__(self, num_in: int, out: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_in, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out))

    def forward(self, rbf: torch.Tensor) -> torch.Tensor:
        return self.net(rbf)
