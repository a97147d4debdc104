"""SO(3) core in e3nn's real spherical-harmonic basis (y is the polar axis, m = -l..l, l-major).

* `spherical_harmonics(vec, lmax)`   real SH, e3nn's convention and normalisation
* `edge_rotation(vec)`               rotation matrices that map each edge direction onto +Y
* `wigner_D_from_matrix(R, lmax)`    per-l Wigner-D blocks of rotation matrices
* `wigner_D(vec, lmax)`              the edge-frame Wigner-D blocks (the product of the two above)
* `wigner_3j(l1, l2, l3)` / `clebsch_gordan(l1, l2, l3)`  coupling coefficients in the same basis
* `l_to_m_major(lmax, mmax)`         EquiformerV2's m-major row order
* `rotate_to_m_major(x, D, mmax)` / `rotate_from_m_major(y, D, lmax)`   into / out of the edge
  frame with only the rows |m| <= mmax of each block (the reduced Wigner blocks)
* `generators(lmax)`                 the so(3) generators L_x, L_y, L_z per degree (for forces)

Wigner-D is closed form: D^l(R) Y^l(P) = Y^l(R P) for any point set P, so with a fixed, well
conditioned set of 2·lmax+1 points, D^l(R) = Y^l(R P) · pinv(Y^l(P)). That is a polynomial of
degree l in the entries of R: exact, batched, differentiable, no matrix exponentials, and only the
Σ(2l+1)² block values are ever stored.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .errors import InputError

__all__ = [
    "spherical_harmonics", "edge_rotation", "wigner_D_from_matrix", "wigner_D", "wigner_3j",
    "clebsch_gordan", "l_to_m_major", "m_major_sizes", "num_coefficients", "rotate", "rotate_back",
    "rotate_to_m_major", "rotate_from_m_major", "generators", "turn_about_polar_axis",
]


def num_coefficients(lmax: int) -> int:
    return (lmax + 1) ** 2


# ----------------------------------------------------------------------------- spherical harmonics
@functools.lru_cache(maxsize=None)
def _sh_norms(lmax: int) -> np.ndarray:
    """N_lm·(sqrt2 for m>0) for real SH with integral normalisation, without Condon-Shortley phase."""
    n = np.zeros((lmax + 1, lmax + 1))
    for l in range(lmax + 1):
        for m in range(l + 1):
            v = (2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m)
            n[l, m] = math.sqrt(v) * (math.sqrt(2.0) if m > 0 else 1.0)
    return n


def spherical_harmonics(vec: torch.Tensor, lmax: int, normalize: bool = True,
                        normalization: str = "integral") -> torch.Tensor:
    """Real spherical harmonics Y_l^m(vec) for l = 0..lmax, shape [..., (lmax+1)^2].

    Equals `e3nn.o3.spherical_harmonics(range(lmax+1), vec, normalize, normalization)`:
    the textbook real SH (no Condon-Shortley phase) with the axes relabelled (x, y, z) -> (z, x, y),
    so y is the polar axis and l = 1 is (x, y, z).
    """
    if normalize:
        vec = vec / vec.norm(dim=-1, keepdim=True)
    out = _sh_components(vec[..., 0], vec[..., 1], vec[..., 2], lmax)
    sh = torch.stack(out, dim=-1)
    if normalization == "component":
        sh = sh * math.sqrt(4 * math.pi)
    elif normalization == "norm":
        scale = torch.tensor([math.sqrt(4 * math.pi / (2 * l + 1)) for l in range(lmax + 1)
                              for _ in range(2 * l + 1)], dtype=sh.dtype, device=sh.device)
        sh = sh * scale
    elif normalization != "integral":
        raise InputError(f"normalization must be 'integral', 'component' or 'norm', not {normalization!r}")
    return sh


def _sh_components(x, y, z, lmax: int) -> list:
    """The (lmax+1)^2 real SH (integral normalisation) of unit vectors given as three same-shape
    tensors, l-major. Textbook frame: polar axis z' = our y, x' = our z, y' = our x."""
    x, y, z = z, x, y
    norms = _sh_norms(lmax)
    # (x + i y)^m = A_m + i B_m, and Q_l^m(z) = P_l^m(z) / sin^m(theta) by the three-term recursion
    A, B = [torch.ones_like(x)], [torch.zeros_like(x)]
    for m in range(1, lmax + 1):
        a, b = A[-1], B[-1]
        A.append(x * a - y * b)
        B.append(x * b + y * a)
    out = [None] * num_coefficients(lmax)
    for m in range(lmax + 1):
        q_prev, q = None, torch.full_like(z, float(np.prod(np.arange(1, 2 * m, 2)) if m else 1.0))
        for l in range(m, lmax + 1):
            if l == m + 1:
                q_prev, q = q, z * (2 * m + 1) * q
            elif l > m + 1:
                q_prev, q = q, ((2 * l - 1) * z * q - (l + m - 1) * q_prev) / (l - m)
            c = l * l + l
            if m == 0:
                out[c] = norms[l, 0] * q
            else:
                nq = norms[l, m] * q
                out[c + m] = nq * A[m]
                out[c - m] = nq * B[m]
    return out


# ----------------------------------------------------------------------------- edge frame
def _check_vectors(vec: torch.Tensor, name: str = "edge_vec") -> torch.Tensor:
    if vec.shape[-1] != 3:
        raise InputError(f"{name} must have shape [..., 3], got {tuple(vec.shape)}")
    length = vec.norm(dim=-1)
    if not torch.isfinite(vec).all():
        raise InputError(f"{name} holds NaN or Inf values: check the atom positions and the cell")
    if (length <= 1e-8).any():
        n = int((length <= 1e-8).sum())
        raise InputError(f"{name} holds {n} vector(s) of zero length: two atoms sit on the same point "
                         "(duplicate atoms, or a self edge at zero cell shift)")
    return length


def edge_rotation(vec: torch.Tensor) -> torch.Tensor:
    """Rotation matrices R [..., 3, 3] with R @ vec/|vec| = +Y.

    The shortest rotation onto +Y for edges in the upper hemisphere; lower-hemisphere edges are
    first turned by pi about z (y -> -y). Both pieces are smooth where used, so R and its gradient are
    finite everywhere, r = ±Y included. The roll about Y differs between the two pieces, which SO(2)
    layers cannot see (they commute with rotations about the edge axis).
    """
    length = _check_vectors(vec)
    u = vec / length.unsqueeze(-1)
    lower = u[..., 1] < 0
    flip = torch.where(lower, -1.0, 1.0).to(u.dtype)
    x, y, z = u[..., 0] * flip, u[..., 1] * flip, u[..., 2]  # now y >= 0
    k = 1.0 / (1.0 + y)
    # R = y I + [v]x + v v^T/(1+y), v = u x Y = (-z, 0, x)
    r00 = y + z * z * k
    r01 = -x
    r02 = -x * z * k
    r10 = x
    r11 = y
    r12 = z
    r20 = -x * z * k
    r21 = -z
    r22 = y + x * x * k
    R = torch.stack([torch.stack([r00, r01, r02], -1), torch.stack([r10, r11, r12], -1),
                     torch.stack([r20, r21, r22], -1)], -2)
    # the flip F = diag(-1, -1, 1) acts first: R_total = R F (columns 0 and 1 change sign)
    col = torch.stack([flip, flip, torch.ones_like(flip)], -1).unsqueeze(-2)
    return R * col


# ----------------------------------------------------------------------------- Wigner-D
@functools.lru_cache(maxsize=None)
def _fit_points(lmax: int) -> np.ndarray:
    """2·lmax+1 unit vectors whose SH matrices are well conditioned for every l <= lmax."""
    rng = np.random.default_rng(20261129)
    best, best_cond = None, np.inf
    n = 2 * lmax + 1
    for _ in range(200):
        p = rng.normal(size=(n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        Y = spherical_harmonics(torch.from_numpy(p), lmax).numpy()
        cond = max(np.linalg.cond(Y[:, l * l:(l + 1) ** 2]) for l in range(lmax + 1))
        if cond < best_cond:
            best, best_cond = p, cond
    return best


@functools.lru_cache(maxsize=None)
def _fit_constants(lmax: int) -> tuple[np.ndarray, list[np.ndarray]]:
    p = _fit_points(lmax)
    Y = spherical_harmonics(torch.from_numpy(p), lmax).numpy()  # [n, K]
    pinvs = [np.linalg.pinv(Y[:, l * l:(l + 1) ** 2].T) for l in range(lmax + 1)]  # [n, 2l+1]
    return p.T.copy(), pinvs  # points as columns [3, n]


def _constants(lmax: int, dtype, device):
    P, pinvs = _fit_constants(lmax)
    return (torch.as_tensor(P, dtype=dtype, device=device),
            [torch.as_tensor(q, dtype=dtype, device=device) for q in pinvs])


def wigner_D_from_matrix(R: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """Per-l Wigner-D blocks [..., 2l+1, 2l+1] (l = 0..lmax) of rotation matrices R [..., 3, 3].

    Convention: Y(R v) = D(R) Y(v), D(R1 R2) = D(R1) D(R2); equals e3nn's `Irrep(l).D_from_matrix`.
    """
    if lmax < 0:
        raise InputError(f"lmax must be >= 0, got {lmax}")
    P, pinvs = _constants(lmax, R.dtype, R.device)
    batch = R.shape[:-2]
    R = R.reshape(-1, 3, 3)
    # rotated fit points, one contiguous [E, n] tensor per coordinate (fast elementwise SH)
    x, y, z = (R[:, c] @ P for c in range(3))
    Y = _sh_components(x, y, z, lmax)
    out = []
    for l in range(lmax + 1):
        Yl = torch.stack(Y[l * l:(l + 1) ** 2], dim=1)  # [E, 2l+1, n]
        d = 2 * l + 1
        out.append((Yl.reshape(-1, Yl.shape[-1]) @ pinvs[l]).reshape(*batch, d, d))  # one tall GEMM per l
    return out


def wigner_D(edge_vec: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """Per-l Wigner-D blocks of the rotation that maps each edge direction onto +Y."""
    return wigner_D_from_matrix(edge_rotation(edge_vec), lmax)


def rotate(x: torch.Tensor, D: list[torch.Tensor]) -> torch.Tensor:
    """Apply per-l blocks D to x [E, (lmax+1)^2, C] (l-major): returns D x, block by block."""
    return torch.cat([D[l] @ x[:, l * l:(l + 1) ** 2] for l in range(len(D))], dim=1)


def rotate_back(x: torch.Tensor, D: list[torch.Tensor]) -> torch.Tensor:
    """Apply the inverse rotation D^T block by block."""
    return torch.cat([D[l].transpose(-1, -2) @ x[:, l * l:(l + 1) ** 2] for l in range(len(D))], dim=1)


@functools.lru_cache(maxsize=None)
def _reduced_plan(lmax: int, mmax: int):
    """(start, count) of the kept rows |m| <= mmax inside each l block, and the permutations between
    the l-major order of the kept rows and the m-major order."""
    keep = [(l - min(l, mmax), 2 * min(l, mmax) + 1) for l in range(lmax + 1)]
    reduced = [l * l + a + i for l, (a, n) in enumerate(keep) for i in range(n)]  # l-major rows kept
    pos = {r: i for i, r in enumerate(reduced)}
    to_m = torch.tensor([pos[r] for r in _m_major(lmax, mmax)], dtype=torch.long)
    from_m = torch.empty_like(to_m)
    from_m[to_m] = torch.arange(len(to_m))
    return keep, to_m, from_m


def _rows(Dl: torch.Tensor, a: int, n: int) -> torch.Tensor:
    """The rows |m| <= mmax of a Wigner block given in full (2l+1 rows) or already reduced (n rows)."""
    return Dl if Dl.shape[-2] == n else Dl.narrow(-2, a, n)


def rotate_to_m_major(x: torch.Tensor, D: list[torch.Tensor], mmax: int) -> torch.Tensor:
    """The rows |m| <= mmax of D x in m-major order ([E, K_m, C]), computed with the reduced blocks
    D^l[rows |m| <= mmax] only: (2·min(l, mmax)+1) × (2l+1) per degree instead of (2l+1)². D may hold
    the full blocks or the reduced ones (e.g. another model's m-truncated Wigner matrices)."""
    lmax = len(D) - 1
    keep, _, from_m = _reduced_plan(lmax, mmax)
    xs = x.split([2 * l + 1 for l in range(lmax + 1)], dim=1)  # split, not slices: one cat in backward
    parts = [_rows(D[l], a, n) @ xs[l] for l, (a, n) in enumerate(keep)]
    # each degree's rows straight to their m-major places: one copy (a cat and a reorder would be two)
    out = parts[0].new_empty(x.shape[0], len(from_m), parts[0].shape[-1])
    pos = from_m.to(x.device).split([n for _, n in keep])
    for p, part in zip(pos, parts):
        out.index_copy_(1, p, part)
    return out


def rotate_from_m_major(y: torch.Tensor, D: list[torch.Tensor], mmax: int) -> torch.Tensor:
    """Dᵀ of m-major edge-frame rows |m| <= mmax ([E, K_m, C]) back to l-major [E, (lmax+1)², C]
    (the dropped rows count as zero), with the reduced blocks (D full or reduced, as above)."""
    lmax = len(D) - 1
    keep, _, from_m = _reduced_plan(lmax, mmax)
    ys = [y.index_select(1, p) for p in from_m.to(y.device).split([n for _, n in keep])]
    return torch.cat([_rows(D[l], a, n).transpose(-1, -2) @ ys[l] for l, (a, n) in enumerate(keep)], dim=1)


def turn_about_polar_axis(y: torch.Tensor, angle: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
    """m-major edge-frame rows turned by `angle` [E] about the polar axis (the frame's roll): each
    (+m, −m) pair of rows maps to (cos mθ·y₊ − sin mθ·y₋, sin mθ·y₊ + cos mθ·y₋), exactly the
    rotation's Wigner-D in this basis; m = 0 rows are unchanged."""
    sizes = [lmax + 1] + [lmax + 1 - m for m in range(1, mmax + 1) for _ in (0, 1)]
    blocks = y.split(sizes, dim=1)
    parts = [blocks[0]]
    for m in range(1, mmax + 1):
        c = torch.cos(m * angle).to(y.dtype).view(-1, 1, 1)
        s = torch.sin(m * angle).to(y.dtype).view(-1, 1, 1)
        yp, ym = blocks[2 * m - 1], blocks[2 * m]
        parts += [c * yp - s * ym, s * yp + c * ym]
    return torch.cat(parts, dim=1)


@functools.lru_cache(maxsize=None)
def _generators_np(lmax: int) -> list[np.ndarray]:
    K = np.array([[[0, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 0, 0], [-1, 0, 0]],
                  [[0, -1, 0], [1, 0, 0], [0, 0, 0]]], dtype=np.float64)
    out = [np.zeros((3, 2 * l + 1, 2 * l + 1)) for l in range(lmax + 1)]
    eye = torch.eye(3, dtype=torch.float64)
    _fit_constants(lmax)  # numpy constants first: they cannot be built inside the jvp transform
    for k in range(3):
        # D is a polynomial in R's entries: its derivative along K at the identity, exactly (forward mode)
        Kk = torch.from_numpy(K[k])
        _, tangents = torch.func.jvp(lambda e: tuple(wigner_D_from_matrix(eye + e * Kk, lmax)),
                                     (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),))
        for l, t in enumerate(tangents):
            out[l][k] = t.numpy()
    return out


def generators(lmax: int, dtype=torch.float64, device=None) -> list[torch.Tensor]:
    """[3, 2l+1, 2l+1] per l: L_k = d/dε D^l(exp(ε K_k)) at ε = 0, K_k the rotation about axis k
    (x, y, z). Skew-symmetric; D^l(exp(ε K_k)) = exp(ε L_k)."""
    return [torch.as_tensor(g, dtype=dtype, device=device) for g in _generators_np(lmax)]


# ----------------------------------------------------------------------------- coupling
@functools.lru_cache(maxsize=None)
def _wigner_3j_np(l1: int, l2: int, l3: int) -> np.ndarray:
    if not (abs(l1 - l2) <= l3 <= l1 + l2):
        raise InputError(f"wigner_3j({l1}, {l2}, {l3}) violates the triangle rule |l1-l2| <= l3 <= l1+l2")
    # the invariant tensor of l1 x l2 x l3 is the null space of (D1 x D2 x D3 - 1) for generic rotations
    rng = np.random.default_rng(7)
    lmax = max(l1, l2, l3)
    n = (2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)
    M = np.zeros((n, n))
    for _ in range(3):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        R = _quat_to_matrix(q)
        D = [d.numpy() for d in wigner_D_from_matrix(torch.from_numpy(R), lmax)]
        K = np.kron(np.kron(D[l1], D[l2]), D[l3]) - np.eye(n)
        M += K.T @ K
    w, v = np.linalg.eigh(M)
    c = v[:, 0] / np.linalg.norm(v[:, 0])
    c[np.abs(c) < 1e-14] = 0.0
    # the overall sign is a convention: ours makes the first non-zero entry (C order) positive
    # (e3nn's follows from complex Condon-Shortley phases and can differ by -1 per triple)
    c *= np.sign(c[np.flatnonzero(np.abs(c) > 1e-9)[0]])
    return c.reshape(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def wigner_3j(l1: int, l2: int, l3: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Invariant tensor [2l1+1, 2l2+1, 2l3+1] of unit Frobenius norm in e3nn's real basis."""
    return torch.as_tensor(_wigner_3j_np(l1, l2, l3), dtype=dtype, device=device)


def clebsch_gordan(l1: int, l2: int, L: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """C[m1, m2, M] = sqrt(2L+1)·3j: for each (l1, l2) the blocks over L form an orthogonal change of
    basis from l1 x l2 to the coupled ⊕_L, so a block B (2l1+1 x 2l2+1) maps to c_M = Σ C B."""
    return wigner_3j(l1, l2, L, dtype, device) * math.sqrt(2 * L + 1)


# ----------------------------------------------------------------------------- m-major order
@functools.lru_cache(maxsize=None)
def _m_major(lmax: int, mmax: int) -> tuple[int, ...]:
    idx = [l * l + l for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        idx += [l * l + l + m for l in range(m, lmax + 1)]
        idx += [l * l + l - m for l in range(m, lmax + 1)]
    return tuple(idx)


def l_to_m_major(lmax: int, mmax: int | None = None) -> torch.Tensor:
    """Indices into l-major rows giving EquiformerV2's m-major order (m = 0 for all l, then +m rows
    and -m rows for each m > 0, l ascending); rows with |m| > mmax are left out."""
    mmax = lmax if mmax is None else mmax
    if not 0 <= mmax <= lmax:
        raise InputError(f"mmax must satisfy 0 <= mmax <= lmax, got mmax={mmax}, lmax={lmax}")
    return torch.tensor(_m_major(lmax, mmax), dtype=torch.long)


def m_major_sizes(lmax: int, mmax: int | None = None) -> list[int]:
    """Number of l values for each m = 0..mmax (each ±m half has this many rows)."""
    mmax = lmax if mmax is None else mmax
    return [lmax + 1 - m for m in range(mmax + 1)]
