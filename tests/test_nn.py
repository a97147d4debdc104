"""Every layer is equivariant: rotating its inputs rotates its outputs by the Wigner-D."""
import pytest
import torch
from conftest import random_rotation, rotate_blocks

from egnn import EgnnError, so3
from egnn.nn import (AttentionAggregation, EdgeRotation, EquivariantLayerNorm, EquivariantLinear, GateActivation,
                     SO2Convolution, SO2Linear, segment_softmax)

L = 3


def _rot(seed):
    R = random_rotation(seed)
    return R, so3.wigner_D_from_matrix(R, L)


def test_edge_rotation_round_trip(f64):
    rot = EdgeRotation(L)
    v, x = torch.randn(40, 3), torch.randn(40, (L + 1) ** 2, 5)
    D = rot.wigner(v)
    assert (rot.from_edge(rot.to_edge(x, D), D) - x).abs().max() < 1e-12


def test_mmax_truncation_drops_high_m(f64):
    rot = EdgeRotation(L, 1)
    v, x = torch.randn(30, 3), torch.randn(30, (L + 1) ** 2, 4)
    D = rot.wigner(v)
    y = rot.to_edge(x, D)
    assert y.shape[1] == (L + 1) + 2 * L
    back = rot.to_edge(rot.from_edge(y, D), D)
    assert (back - y).abs().max() < 1e-12  # from_edge is the transpose of to_edge


@pytest.mark.parametrize("mmax", [L, 2])
def test_so2_convolution_message_is_equivariant(f64, mmax):
    torch.manual_seed(0)
    rot, conv = EdgeRotation(L, mmax), SO2Convolution(L, mmax, 6, 8, 5, extra_scalars=3).double()
    v, x = torch.randn(50, 3), torch.randn(50, (L + 1) ** 2, 6)
    R, DR = _rot(3)

    def message(v, x):
        D = rot.wigner(v)
        y, extra = conv(rot.to_edge(x, D), torch.rand(50, 1, 6, generator=torch.Generator().manual_seed(1)))
        return rot.from_edge(y, D), extra

    y1, s1 = message(v, x)
    y2, s2 = message(v @ R.T, rotate_blocks(x, DR))
    assert (rotate_blocks(y1, DR) - y2).abs().max() < 1e-10
    assert (s1 - s2).abs().max() < 1e-10  # the extra scalars are invariant


def test_so2_linear_matches_dense_per_m_reference(f64):
    """The ±m mixing equals the complex-multiplication form [[W1, -W2], [W2, W1]] written out."""
    torch.manual_seed(1)
    lin = SO2Linear(2, 2, 3, 4).double()
    x = torch.randn(7, 9, 3)
    y, _ = lin(x)
    n = 2  # m = 1 has l = 1, 2
    W = lin.w[0].view(n * 3, 2, n * 4)
    W1, W2 = W[:, 0], W[:, 1]
    xp, xm = x[:, 3:5].reshape(7, -1), x[:, 5:7].reshape(7, -1)
    assert (y[:, 3:5].reshape(7, -1) - (xp @ W1 - xm @ W2)).abs().max() < 1e-12
    assert (y[:, 5:7].reshape(7, -1) - (xp @ W2 + xm @ W1)).abs().max() < 1e-12


def test_norm_linear_gate_are_equivariant(f64):
    torch.manual_seed(2)
    x = torch.randn(20, (L + 1) ** 2, 6)
    _, D = _rot(5)
    row_l = torch.tensor([l for l in range(L + 1) for _ in range(2 * l + 1)])
    gates = torch.randn(20, L * 6)
    for f in (EquivariantLayerNorm(L, 6).double(), EquivariantLinear(L, 6, [3, 2, 4, 1]).double(),
              lambda t: GateActivation(row_l, L, 6)(t, gates)):
        assert (rotate_blocks(f(x), D) - f(rotate_blocks(x, D))).abs().max() < 1e-10


def test_padded_linear_outputs_are_zero_beyond_counts(f64):
    lin = EquivariantLinear(2, 4, [2, 3, 1]).double()
    y = lin(torch.randn(5, 9, 4))
    assert y.shape == (5, 9, 3) and y[:, 1:4].abs().min() > 0
    assert y[:, 0, 2:].abs().max() == 0 and y[:, 4:9, 1:].abs().max() == 0


def test_attention_aggregation_against_loop(f64):
    torch.manual_seed(3)
    dst = torch.tensor([0, 0, 0, 2, 2, 3])  # node 1 has no incoming edges
    logits, values = torch.randn(6, 2), torch.randn(6, 4, 6)
    out = AttentionAggregation(2)(logits, values, dst, 5)
    ref = torch.zeros(5, 4, 6)
    for d in range(5):
        sel = dst == d
        if sel.any():
            a = torch.softmax(logits[sel], dim=0)
            for h in range(2):
                ref[d, :, 3 * h:3 * h + 3] = (a[:, h, None, None] * values[sel][:, :, 3 * h:3 * h + 3]).sum(0)
    assert (out - ref).abs().max() < 1e-12
    assert out[1].abs().max() == 0 and out[4].abs().max() == 0


def test_attention_accumulates_in_float32_for_half_inputs():
    torch.manual_seed(4)
    dst = torch.zeros(3000, dtype=torch.long)
    logits, values = torch.randn(3000, 1), torch.randn(3000, 1, 2)
    out16 = AttentionAggregation(1)(logits.bfloat16(), values.bfloat16(), dst, 1)
    ref = AttentionAggregation(1)(logits.double(), values.double(), dst, 1)
    assert out16.dtype == torch.bfloat16
    # bf16 inputs carry ~4e-3 relative error each; the sum itself must not add more
    assert (out16.double() - ref).abs().max() < 2e-2 * values.abs().mean()
    assert torch.allclose(segment_softmax(logits, dst, 1).sum(0), torch.ones(1))


def test_bad_degrees():
    with pytest.raises(EgnnError, match="mmax"):
        EdgeRotation(2, 3)
    with pytest.raises(EgnnError, match="mmax"):
        SO2Linear(2, 3, 4, 4)
