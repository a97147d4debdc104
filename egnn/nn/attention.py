"""Attention-weighted aggregation of edge messages onto their destination nodes.

`backend="auto" | "triton" | "torch"` (egnn.nn.backend): the Triton kernel (edges sorted by dst,
one program per destination segment, no atomics) on CUDA, this file's PyTorch code on CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backend as _backend


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def segment_softmax(logits: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of logits [E, H] over the edges of each destination; float32 accumulation."""
    z = logits.to(_acc_dtype(logits.dtype))
    H = z.shape[1]
    idx = dst.unsqueeze(1).expand(-1, H)
    zmax = z.new_full((num_nodes, H), -torch.inf).scatter_reduce(0, idx, z, "amax", include_self=True)
    ez = torch.exp(z - zmax.index_select(0, dst).detach())
    denom = z.new_zeros(num_nodes, H).index_add_(0, dst, ez)
    return ez / denom.index_select(0, dst)


class AttentionAggregation(nn.Module):
    """out[d] = Σ_{e -> d} softmax_e(logits)[h] · values[e, :, channels of head h].

    values [E, K, C] with C divisible by num_heads; sums run in float32 and the result is cast
    back to the values' dtype. Nodes without incoming edges get zeros.
    """

    def __init__(self, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend = _backend.check_backend(backend)

    def forward(self, logits: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        if _backend.resolve(self.backend, values.device) == "triton":
            from ..kernels import attention_aggregate
            return attention_aggregate(values, logits, dst, num_nodes, backend="triton")
        E, K, C = values.shape
        H = self.num_heads
        acc = _acc_dtype(values.dtype)
        alpha = segment_softmax(logits, dst, num_nodes).to(acc)  # [E, H]
        weighted = values.to(acc).view(E, K, H, C // H) * alpha.view(E, 1, H, 1)
        out = torch.zeros((num_nodes, K, C), dtype=acc, device=values.device)
        out.index_add_(0, dst, weighted.view(E, K, C))
        return out.to(values.dtype)
