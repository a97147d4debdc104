"""egnn.kernels: Triton kernels, their torch.library ops (egnn::*) and pure-PyTorch twins.

Installed as the sub-package `egnn.kernels` (never a top-level `kernels`)."""
