import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest
import torch


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_rotation(seed: int, dtype=torch.float64) -> torch.Tensor:
    """A uniformly random proper rotation matrix (from a normalised quaternion)."""
    q = np.random.default_rng(seed).normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    R = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])
    return torch.tensor(R, dtype=dtype)


def rotate_blocks(x: torch.Tensor, D: list) -> torch.Tensor:
    """Apply per-l Wigner blocks (of one rotation) to rows of x [N, (L+1)^2, C]."""
    return torch.cat([D[l] @ x[:, l * l:(l + 1) ** 2] for l in range(len(D))], dim=1)
