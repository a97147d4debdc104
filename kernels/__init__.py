"""egnn.kernels: Triton kernels, their torch.library ops (egnn::*) and pure-PyTorch twins.

Installed as the sub-package `egnn.kernels` (never a top-level `kernels`). Three layers per op
(DESIGN.md): the @triton.jit kernels (rotate.py, aggregate.py, so2.py, with rotate_io.py and the
generated per-degree maths of _wigner.py; imported lazily so TRITON_INTERPRET can be set first), the
ops with their launchers (ops.py) and twins (_torch_impl.py), and the autograd rules and public
functions below. backend.py decides which one runs; resources.py compiles every launch for the
GPU targets without a GPU (the compile lane).
"""
from .ops import attention_aggregate, launch_config, rotate_back, rotate_to_edge, so2_linear

__all__ = ["rotate_to_edge", "rotate_back", "so2_linear", "attention_aggregate", "launch_config"]
