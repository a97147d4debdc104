import itertools

import pytest
import torch
from conftest import random_rotation
from e3nn import o3

from egnn import EgnnError, so3


@pytest.mark.parametrize("normalization", ["integral", "component", "norm"])
def test_spherical_harmonics_match_e3nn(f64, normalization):
    v = torch.randn(300, 3) * 2.5
    ours = so3.spherical_harmonics(v, 6, normalization=normalization)
    ref = o3.spherical_harmonics(list(range(7)), v, True, normalization=normalization)
    assert (ours - ref).abs().max() < 1e-12


def test_wigner_D_matches_e3nn(f64):
    R = torch.stack([random_rotation(s) for s in range(20)])
    D = so3.wigner_D_from_matrix(R, 6)
    for l in range(7):
        assert (D[l] - o3.Irrep(l, 1).D_from_matrix(R)).abs().max() < 1e-10
    alpha, beta, gamma = torch.rand(3, 20) * 6.0
    Re = o3.angles_to_matrix(alpha, beta, gamma)
    D = so3.wigner_D_from_matrix(Re, 4)
    for l in range(5):
        assert (D[l] - o3.wigner_D(l, alpha, beta, gamma)).abs().max() < 1e-10


def test_wigner_D_orthogonal_and_homomorphism(f64):
    R1, R2 = random_rotation(1), random_rotation(2)
    D1, D2, D12 = (so3.wigner_D_from_matrix(R, 5) for R in (R1, R2, R1 @ R2))
    for l in range(6):
        eye = torch.eye(2 * l + 1)
        assert (D1[l] @ D1[l].T - eye).abs().max() < 1e-12
        assert (D12[l] - D1[l] @ D2[l]).abs().max() < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_edge_frame_sends_edge_to_plus_y(dtype, tol):
    v = torch.randn(500, 3, dtype=dtype)
    v[:4] = torch.tensor([[0, 1, 0], [0, -3, 0], [1e-9, 1, 0], [0, -1, 1e-9]], dtype=dtype)
    D = so3.wigner_D(v, 4)
    Y = so3.spherical_harmonics(v, 4)
    rotated = torch.cat([D[l] @ Y[:, l * l:(l + 1) ** 2, None] for l in range(5)], 1).squeeze(-1)
    m0 = torch.tensor([l * l + l for l in range(5)])
    off = torch.ones(25, dtype=torch.bool)
    off[m0] = False
    assert rotated[:, off].abs().max() < tol
    # and the m = 0 entries are those of Y(+y)
    Yy = so3.spherical_harmonics(torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype), 4)
    assert (rotated[:, m0] - Yy[:, m0]).abs().max() < tol


def test_wigner_D_gradcheck_including_poles(f64):
    v = torch.tensor([[0.3, 0.8, -0.5], [0.0, 1.0, 0.0], [0.0, -2.0, 0.0], [1.0, -0.2, 0.4]], requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.cat([d.flatten(1) for d in so3.wigner_D(x, 3)], 1), (v,))
    g = torch.autograd.grad(so3.wigner_D(v, 4)[4].sum(), v)[0]
    assert torch.isfinite(g).all()


def test_wigner_3j_invariant_and_matches_e3nn(f64):
    for l1, l2, l3 in itertools.product(range(4), range(4), range(7)):
        if not abs(l1 - l2) <= l3 <= l1 + l2:
            continue
        C = so3.wigner_3j(l1, l2, l3)
        ref = o3.wigner_3j(l1, l2, l3).double()
        # the overall sign of each invariant tensor is a convention (ours: first non-zero entry > 0)
        sign = torch.sign((C * ref).sum())
        assert (C - sign * ref).abs().max() < 1e-6
        R = random_rotation(l1 + 10 * l2 + 100 * l3)
        D = so3.wigner_D_from_matrix(R, 6)
        rotated = torch.einsum("ai,bj,ck,ijk->abc", D[l1], D[l2], D[l3], C)
        assert (rotated - C).abs().max() < 1e-10


def test_clebsch_gordan_is_orthogonal_change_of_basis(f64):
    for l1, l2 in [(1, 1), (2, 1), (2, 2), (3, 2)]:
        U = torch.cat([so3.clebsch_gordan(l1, l2, L).flatten(0, 1) for L in range(abs(l1 - l2), l1 + l2 + 1)], 1)
        assert (U.T @ U - torch.eye(U.shape[1])).abs().max() < 1e-12


def test_m_major_order():
    idx = so3.l_to_m_major(2).tolist()
    # m = 0 rows of l = 0, 1, 2; then +1 rows (l = 1, 2), -1 rows; then +2, -2 of l = 2
    assert idx == [0, 2, 6, 3, 7, 1, 5, 8, 4]
    assert sorted(so3.l_to_m_major(4).tolist()) == list(range(25))
    assert len(so3.l_to_m_major(4, 2)) == 5 + 2 * 4 + 2 * 3


def test_bad_input():
    with pytest.raises(EgnnError, match="zero length"):
        so3.wigner_D(torch.zeros(2, 3), 2)
    with pytest.raises(EgnnError, match="NaN"):
        so3.wigner_D(torch.tensor([[float("nan"), 0.0, 1.0]]), 2)
    with pytest.raises(EgnnError, match="mmax"):
        so3.l_to_m_major(2, 3)
    with pytest.raises(EgnnError, match="triangle"):
        so3.wigner_3j(1, 1, 3)
