"""Equivariant layer norm (EquiformerV2's 'separate L=0' variant)."""
from __future__ import annotations

import torch
from torch import nn


class EquivariantLayerNorm(nn.Module):
    """l = 0: ordinary LayerNorm over channels. l > 0: divide by the RMS over channels and m of the
    per-l norms (no centring, which would break equivariance), then a per-(l, channel) scale."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.scalar = nn.LayerNorm(channels, eps=eps)
        self.weight = nn.Parameter(torch.ones(lmax, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [self.scalar(x[:, :1])]
        for l in range(1, self.lmax + 1):
            xl = x[:, l * l:(l + 1) ** 2]
            rms = xl.pow(2).sum(dim=1, keepdim=True).mean(dim=2, keepdim=True).add(self.eps).rsqrt()
            out.append(xl * rms * self.weight[l - 1])
        return torch.cat(out, dim=1)
