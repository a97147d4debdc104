"""Figures: the partition drawn on the atoms (2-D projection, one colour per rank) and the
communication topology (node = rank, edge width proportional to bytes exchanged)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["plot_partition", "plot_topology", "save_figures"]


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _colours(nparts: int) -> np.ndarray:
    """RGBA per rank: tab20 up to 20 ranks, else hsv with consecutive ids spread apart."""
    plt = _pyplot()
    idx = np.arange(nparts)
    if nparts <= 20:
        return plt.get_cmap("tab20")(idx)
    step = next(s for s in (7, 11, 13, 17, 1) if np.gcd(s, nparts) == 1)
    return plt.get_cmap("hsv")((idx * step % nparts) / nparts)


def plot_partition(positions, parts, ax=None, axes: str = "xy", nparts: int | None = None):
    """Scatter of the atoms projected on the plane `axes` ('xy', 'xz' or 'yz'), coloured by rank."""
    plt = _pyplot()
    if len(axes) != 2 or any(c not in "xyz" for c in axes):
        raise InputError(f"axes must name two of x, y, z (e.g. 'xy'), got {axes!r}")
    pos = np.asarray(positions, dtype=np.float64)
    parts = np.asarray(parts, dtype=np.int64)
    nparts = int(parts.max()) + 1 if nparts is None else nparts
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    i, j = ("xyz".index(axes[0]), "xyz".index(axes[1]))
    size = float(np.clip(2e4 / max(len(pos), 1), 0.5, 40))
    ax.scatter(pos[:, i], pos[:, j], c=_colours(nparts)[parts], s=size, linewidths=0)
    ax.set_xlabel(f"{axes[0]} (Å)")
    ax.set_ylabel(f"{axes[1]} (Å)")
    ax.set_aspect("equal")
    ax.set_title(f"{len(pos)} atoms in {nparts} parts")
    return ax


def plot_topology(q, ax=None, seed: int = 0):
    """Rank graph of a Quality: node = rank, edge q-r width ∝ bytes sent both ways (spring layout)."""
    import networkx as nx

    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    g = nx.Graph()
    g.add_nodes_from(range(q.nparts))
    for a, b, n in zip(q.pair_owner.tolist(), q.pair_rank.tolist(), q.pair_atoms.tolist()):
        w = n * q.row_bytes
        if g.has_edge(a, b):
            g[a][b]["bytes"] += w
        else:
            g.add_edge(a, b, bytes=w)
    widths = np.array([d["bytes"] for _, _, d in g.edges(data=True)], dtype=np.float64)
    top = widths.max() if len(widths) and widths.max() > 0 else 1.0
    for _, _, d in g.edges(data=True):
        d["w"] = d["bytes"] / top  # spring layout wants O(1) weights: heavy links pull closer
    pos = nx.spring_layout(g, seed=seed, weight="w")
    widths = 0.2 + 3.0 * widths / top
    nx.draw_networkx_edges(g, pos, ax=ax, width=widths, alpha=0.4)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=max(10, 3000 // max(q.nparts, 1)),
                           node_color=_colours(q.nparts))
    if q.nparts <= 64:
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=7)
    ax.set_title(f"{q.nparts} ranks: mean {q.neighbours.mean():.1f} neighbours, "
                 f"mean halo {q.bytes_recv.mean() / 2**20:.2f} MiB")
    ax.set_axis_off()
    return ax


def save_figures(path, positions, parts, q, axes: str = "xy", dpi: int = 120) -> None:
    """One PNG with both panels: the partition on the atoms and the communication topology."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6))
    try:
        plot_partition(positions, parts, ax=a, axes=axes, nparts=q.nparts)
        plot_topology(q, ax=b)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise InputError(f"cannot write the figure {path}: {exc}; check the directory") from exc
    finally:
        plt.close(fig)
