"""Per-degree linear maps: channels mix within each l (no mixing across l or m), bias on l = 0 only."""
from __future__ import annotations

import math

import torch
from torch import nn


class EquivariantLinear(nn.Module):
    """x [rows, (lmax+1)^2, C_in] -> [rows, (lmax+1)^2, C_out] with one weight matrix per l.

    `out_channels` may be a list (one count per l): rows of degree l then use only the first
    out_channels[l] output channels and the rest are zero (the padded output heads of the model).
    """

    def __init__(self, lmax: int, in_channels: int, out_channels, bias: bool = True):
        super().__init__()
        self.lmax = lmax
        counts = [out_channels] * (lmax + 1) if isinstance(out_channels, int) else list(out_channels)
        assert len(counts) == lmax + 1
        self.out_counts = counts
        self.out_channels = max(counts) if counts else 0
        w = torch.randn(lmax + 1, in_channels, self.out_channels) / math.sqrt(in_channels)
        mask = torch.zeros(lmax + 1, 1, self.out_channels)
        for l, n in enumerate(counts):
            mask[l, :, :n] = 1.0
        self.weight = nn.Parameter(w * mask)
        self.register_buffer("mask", mask, persistent=False)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.register_buffer("row_l", torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.mask
        out = torch.cat([x[:, l * l:(l + 1) ** 2] @ w[l] for l in range(self.lmax + 1)], dim=1)
        if self.bias is not None:
            b0 = self.bias * self.mask[0, 0]
            out = torch.cat([out[:, :1] + b0, out[:, 1:]], dim=1)
        return out
