"""Gate activation: SiLU on l = 0, sigmoid gates (invariant scalars) on every l > 0 channel."""
from __future__ import annotations

import torch
from torch import nn


class GateActivation(nn.Module):
    """x [rows, K, C] (l-major or m-major, given by `row_l`, the degree of each row) and
    gates [rows, lmax·C] -> SiLU(x_{l=0}), x_{l>0} · sigmoid(gate_{l, c})."""

    def __init__(self, row_l: torch.Tensor, lmax: int, channels: int):
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.register_buffer("row_l", row_l.clone(), persistent=False)

    @property
    def num_gates(self) -> int:
        return self.lmax * self.channels

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(gates).view(-1, self.lmax, self.channels)
        g = torch.cat([torch.ones_like(g[:, :1]), g], dim=1)  # row for l = 0 (unused)
        g = g.index_select(1, self.row_l)
        scalar = self.row_l == 0
        return torch.where(scalar[None, :, None], torch.nn.functional.silu(x), x * g)
