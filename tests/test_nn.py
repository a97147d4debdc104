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


# ----------------------------------------------------------------------------- layer options (fairchem's layouts)
def _message(rot, conv, v, x, scale=None, roll=None):
    D = rot.wigner(v, roll)
    y, extra = conv(rot.to_edge(x, D), scale)
    return rot.from_edge(y, D), extra


def test_options_keep_the_message_equivariant_and_roll_free(f64):
    """Per-(m, l) radial scale, extra outputs first, EquiformerV2's rescale: still equivariant, and
    with an SO(2)-equivariant activation (the gate) the roll about the edge changes nothing."""
    torch.manual_seed(5)
    mmax, E = 2, 40
    rot = EdgeRotation(L, mmax, rescale=True)
    conv = SO2Convolution(L, mmax, 6, 8, 5, extra_scalars=3, extra_first=True).double()
    v, x = torch.randn(E, 3), torch.randn(E, (L + 1) ** 2, 6)
    scale = torch.rand(E, sum(so3.m_major_sizes(L, mmax)), 6)  # one row per (m, l), as fairchem's rad_func
    R, DR = _rot(7)
    y1, s1 = _message(rot, conv, v, x, scale)
    y2, s2 = _message(rot, conv, v @ R.T, rotate_blocks(x, DR), scale)
    y3, s3 = _message(rot, conv, v, x, scale, roll=torch.rand(E) * 6.3)
    assert (rotate_blocks(y1, DR) - y2).abs().max() < 1e-10 and (s1 - s2).abs().max() < 1e-10
    assert (y3 - y1).abs().max() < 1e-10 and (s3 - s1).abs().max() < 1e-10
    plain, _ = _message(EdgeRotation(L, mmax), conv, v, x, scale)
    f = torch.tensor([1.0] * 9 + [(7 / 5) ** 0.5] * 7)  # √((2l+1)/(2·mmax+1)) on l = 3 > mmax only
    assert (y1 - plain * f[None, :, None]).abs().max() < 1e-12


def test_extra_first_and_scale_layouts_are_the_same_linear(f64):
    """extra_first is the m = 0 weight with the extra rows moved; a per-(m, l) scale equals its
    expansion to the ±m rows."""
    torch.manual_seed(6)
    mmax, X, E = 2, 4, 9
    first = SO2Linear(L, mmax, 3, 5, extra_scalars=X, extra_first=True).double()
    last = SO2Linear(L, mmax, 3, 5, extra_scalars=X).double()
    with torch.no_grad():
        last.m0.weight.copy_(torch.cat([first.m0.weight[X:], first.m0.weight[:X]]))
        last.m0.bias.copy_(torch.cat([first.m0.bias[X:], first.m0.bias[:X]]))
        for a, b in zip(last.w, first.w):
            a.copy_(b)
    sizes = so3.m_major_sizes(L, mmax)
    x, s = torch.randn(E, sum(sizes) * 2 - sizes[0], 3), torch.rand(E, sum(sizes), 3)
    rows = torch.cat([torch.arange(sizes[0])] + [torch.arange(sum(sizes[:m]), sum(sizes[:m + 1])).repeat(2)
                                                  for m in range(1, mmax + 1)])
    (y1, e1), (y2, e2) = first(x, s), last(x, s[:, rows])
    assert (y1 - y2).abs().max() < 1e-12 and (e1 - e2).abs().max() < 1e-12
    y3, _ = first(x, s.reshape(E, -1))  # the flat [E, Σ n_m·C_in] layout of fairchem's radial MLP
    assert (y3 - y1).abs().max() == 0
    with pytest.raises(EgnnError, match="scale"):
        first(x, torch.rand(E, 5, 3))


def test_user_frame_equals_direction_and_roll(f64):
    torch.manual_seed(7)
    v, roll = torch.randn(20, 3), torch.rand(20) * 6.0 - 3.0
    c, s, z, o = roll.cos(), roll.sin(), torch.zeros(20), torch.ones(20)
    Ry = torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)
    frame = Ry @ so3.edge_rotation(v)
    rot = EdgeRotation(L)
    for a, b, c in zip(rot.wigner(frame=frame), rot.wigner(v, roll), so3.wigner_D_from_matrix(frame, L)):
        assert (a - b).abs().max() < 1e-12 and (a - c).abs().max() < 1e-12
    with pytest.raises(EgnnError, match="not both"):
        rot.wigner(v, frame=frame)
    with pytest.raises(EgnnError, match="rotation matrices"):
        rot.wigner(frame=v)


def test_s2_activations(f64):
    """The grid projection is exact on band-limited rows; the separable S2's l = 0 row is SiLU of
    its own scalars; on a grid the S2 activation is equivariant only approximately, ever closer as
    the grid is refined (EquiformerV2's default grid is coarse)."""
    from egnn.nn.activation import S2Activation, SeparableS2Activation, s2_grid

    to_g, from_g = s2_grid(L, 2)
    assert (from_g @ to_g - torch.eye(to_g.shape[1])).abs().max() < 1e-12
    torch.manual_seed(8)
    x, sc = torch.randn(10, to_g.shape[1], 4), torch.randn(10, 4)
    sep = SeparableS2Activation(L, 2, 4)
    assert (sep(x, sc)[:, 0] - torch.nn.functional.silu(sc)).abs().max() == 0
    assert (sep(x, sc)[:, 1:] - S2Activation(L, 2)(x)[:, 1:]).abs().max() == 0
    v, x = torch.randn(50, 3), torch.randn(50, (L + 1) ** 2, 6)
    R, DR = _rot(3)
    rot, errs = EdgeRotation(L, 2), []
    for res in (None, (16, 17), (24, 25)):
        torch.manual_seed(0)
        conv = SO2Convolution(L, 2, 6, 8, 5, act=S2Activation(L, 2, *s2_grid(L, 2, res)))
        y1, _ = _message(rot, conv, v, x)
        y2, _ = _message(rot, conv, v @ R.T, rotate_blocks(x, DR))
        errs.append(float((rotate_blocks(y1, DR) - y2).detach().abs().max() / y2.detach().abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs
    with pytest.raises(EgnnError, match="num_scalars"):
        SO2Convolution(L, 2, 6, 8, 5, act=torch.nn.SiLU())
    with pytest.raises(EgnnError, match="unknown activation"):
        SO2Convolution(L, 2, 6, 8, 5, act="relu")


def test_bad_degrees():
    with pytest.raises(EgnnError, match="mmax"):
        EdgeRotation(2, 3)
    with pytest.raises(EgnnError, match="mmax"):
        SO2Linear(2, 3, 4, 4)
