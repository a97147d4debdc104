"""`egnn partition`: JSON report, --save, --plot, --tile, CP2K input, and clean errors."""
import itertools
import os
import json

import ase
import ase.io
import numpy as np
import pytest

from egnn.cli import main
from egnn.graph import radius_graph
from egnn.partition import low_nn, quality

TINY_INP = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k", "hfo2_m12_szv", "hfo2_m12.inp")


@pytest.fixture
def cube_file(tmp_path):
    frac = np.array(list(itertools.product(range(4), repeat=3)), dtype=float) / 4
    atoms = ase.Atoms("H" * 64, scaled_positions=frac, cell=np.eye(3) * 12.0, pbc=True)
    path = tmp_path / "cube.extxyz"
    ase.io.write(path, atoms)
    return str(path), atoms


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_save_plot(cube_file, tmp_path, capsys):
    path, atoms = cube_file
    npy, png = tmp_path / "parts.npy", tmp_path / "fig.png"
    out = run_json(capsys, ["partition", path, "--r-cut", "3.1", "--parts", "8", "--json",
                            "--save", str(npy), "--plot", str(png)])
    for key in ("atoms", "edges", "parts", "method", "time_graph_s", "time_partition_s", "neighbours_mean",
                "neighbours_max", "halo_mean", "halo_max", "edge_imbalance"):
        assert key in out
    assert out["atoms"] == 64 and out["edges"] == 64 * 6 and out["parts"] == 8 and out["method"] == "low-nn"
    assert out["neighbours_max"] == 3 and out["halo_mean"] == 24 and out["edge_imbalance"] == 1.0
    parts = np.load(npy)
    assert parts.dtype == np.int64
    g = radius_graph(atoms, 3.1)
    np.testing.assert_array_equal(parts, low_nn(g.positions, g.cell, g.pbc, g.degree, 8, 3.1))
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["metis", "linear"])
def test_tile_and_methods(cube_file, tmp_path, capsys, method):
    path, atoms = cube_file
    npy = tmp_path / "p.npy"
    out = run_json(capsys, ["partition", path, "--r-cut", "3.1", "--parts", "5", "--method", method,
                            "--tile", "2x1x1", "--save", str(npy), "--json"])
    assert out["atoms"] == 128 and out["method"] == method and out["tile"] == [2, 1, 1]
    parts = np.load(npy)
    g = radius_graph(atoms.repeat((2, 1, 1)), 3.1)
    s = quality(g, parts, nparts=5).summary()
    assert out["halo_max"] == s["halo_max"] and out["neighbours_mean"] == s["neighbours_mean"]
    assert np.bincount(parts, minlength=5).min() > 0


def test_table_output(cube_file, capsys):
    assert main(["partition", cube_file[0], "--r-cut", "3.1", "--parts", "8"]) == 0
    text = capsys.readouterr().out
    assert "neighbour ranks" in text and "partition" in text and "edge imbalance" in text


def test_cp2k_input(capsys):
    out = run_json(capsys, ["partition", TINY_INP, "--r-cut", "6", "--parts", "4", "--tile", "2", "--json"])
    assert out["atoms"] == 96 and out["parts"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--parts", "0"], "--parts"),
    (["--parts", "65"], "--parts"),
    (["--parts", "2", "--r-cut", "0"], "r-cut"),
    (["--parts", "2", "--r-cut", "-3"], "r-cut"),
    (["--parts", "2", "--tile", "2xx"], "--tile"),
])
def test_bad_arguments(cube_file, capsys, argv, message):
    assert main(["partition", cube_file[0], *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_files(tmp_path, capsys):
    junk = tmp_path / "junk.xyz"
    junk.write_text("this is not\na structure\n")
    assert main(["partition", str(junk), "--parts", "2"]) == 2
    err = capsys.readouterr().err
    assert "junk.xyz" in err and "cannot read" in err
    assert main(["partition", str(tmp_path / "missing.cif"), "--parts", "2"]) == 2
    assert "no such structure file" in capsys.readouterr().err
    # a periodic cell of zero volume
    flat = ase.Atoms("H2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[4, 0, 0], [8, 0, 0], [0, 0, 4]], pbc=True)
    p = tmp_path / "flat.extxyz"
    ase.io.write(p, flat)
    assert main(["partition", str(p), "--parts", "2", "--r-cut", "3"]) == 2
    assert "zero" in capsys.readouterr().err
    # tiling an open axis
    mol = ase.Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
    p = tmp_path / "mol.xyz"
    ase.io.write(p, mol)
    assert main(["partition", str(p), "--parts", "2", "--tile", "2x1x1"]) == 2
    assert "not periodic" in capsys.readouterr().err
