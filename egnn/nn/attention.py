"""Attention-weighted aggregation of edge messages onto their destination nodes.

`backend="auto" | "triton" | "torch"` (egnn.kernels.backend): egnn.kernels.attention_aggregate, the
Triton kernel (edges sorted by dst, one program per destination segment, no atomics) on CUDA and
its PyTorch twin on CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels import backend as _backend
from ..kernels._torch_impl import segment_softmax

__all__ = ["AttentionAggregation", "segment_softmax"]


class AttentionAggregation(nn.Module):
    """out[d] = Σ_{e -> d} softmax_e(logits)[h] · values[e, :, channels of head h].

    values [E, K, C] with C divisible by num_heads; sums run in float32 and the result is cast
    back to the values' dtype. Nodes without incoming edges get zeros. Edges sorted by dst.
    """

    def __init__(self, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend = _backend.check_backend(backend)

    def forward(self, logits: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        return kernels.attention_aggregate(values, logits, dst, num_nodes, backend=self.backend)
