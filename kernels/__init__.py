"""egnn.kernels: Triton kernels, their torch.library ops (egnn::*) and pure-PyTorch twins.

Installed as the sub-package `egnn.kernels` (never a top-level `kernels`).

Three layers per op (see DESIGN.md): the @triton.jit kernels (rotate.py,
so2.py, aggregate.py, imported lazily so TRITON_INTERPRET can be set first), the ops with their
launchers and twins (ops.py, _torch_impl.py), and the autograd rules + public functions below.
"""
from .ops import attention_aggregate, rotate_back, rotate_to_edge, so2_linear

__all__ = ["rotate_to_edge", "rotate_back", "so2_linear", "attention_aggregate"]
