"""egnn data convert / info and the loader."""
import json
import os

import numpy as np
import pytest
import torch

from egnn import blocks as B
from egnn.cli import main
from egnn.dataset import Dataset, convert, info
from egnn.errors import EgnnError
from egnn.graph import radius_graph
from egnn.io.cp2k import read_run

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
RUNS = [os.path.join(FIX, r) for r in ("hfo2_m12_szv", "hfo2_m12_rattled_s0000", "h2o_box6_szv")]


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("d") / "ds")
    assert main(["data", "convert", *RUNS, "-o", out, "--r-cut", "13", "--json"]) == 0
    return out


def test_manifest_and_info(ds_path, capsys):
    m = json.load(open(os.path.join(ds_path, "manifest.json")))
    assert m["format"] == "egnn-dataset" and m["version"] == 1 and m["units"]["H"] == "eV"
    assert [e["mode"] for e in m["structures"]] == ["folded", "real_space", "folded"]
    assert m["structures"][1]["source"].endswith("hfo2_m12_rattled_s0000")
    assert main(["data", "info", ds_path, "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["structures"] == 3 and d["atoms"] == 27 and d["orbitals"] == 150
    assert info(ds_path)["edges"] == sum(e["edges"] for e in m["structures"])


def test_loader_reproduces_hamiltonian(ds_path):
    ds = Dataset(ds_path, dtype=torch.float64, overlap=True)
    x = ds[1]
    s = read_run(RUNS[1])
    assert x.mode == "real_space" and np.allclose(x.atoms.positions, s.atoms.positions, atol=0)
    g = radius_graph(s.atoms, 13.0)
    assert np.array_equal(x.graph.src, g.src) and np.abs(x.graph.vec - g.vec).max() < 1e-12
    assert x.node_target.shape == x.node_mask.shape and x.edge_target.dtype == torch.float64
    HR = B.assemble(x.graph, x.node_target, x.edge_target, ds.basis)
    for R, M in HR.items():
        assert abs(M - s.H.get(R, 0 * M)).max() <= 1e-12
    HS = B.assemble(x.graph, x.overlap["node_target"], x.overlap["edge_target"], ds.basis)
    assert abs(HS[(0, 0, 0)] - s.S[(0, 0, 0)]).max() <= 1e-12
    # padding is zero, the mask marks exactly the stored values
    assert torch.all(x.edge_target[~x.edge_mask] == 0)
    assert int(x.edge_mask.sum()) == sum(s.basis.n_orbitals(int(a)) * s.basis.n_orbitals(int(b))
                                         for a, b in zip(x.atoms.numbers[x.graph.dst], x.atoms.numbers[x.graph.src]))


def test_loader_folded_gamma(ds_path):
    ds = Dataset(ds_path)
    x = ds[0]
    assert x.mode == "folded" and x.edge_target is None and x.pair_target.dtype == torch.float32
    s = read_run(RUNS[0])
    # the Γ diagonal block of atom 0 (Hf) is the node + all its self images, target holds it exactly
    pad = x.pair_target[0:1].double()
    blk = B.from_coupled(pad, "Hf", "Hf", ds.basis)[0].numpy()
    assert np.abs(blk - s.H[(0, 0, 0)].toarray()[:10, :10]).max() < 1e-4 * np.abs(blk).max()
    assert len(x.edge_fold) == x.graph.num_edges and int(x.edge_fold.max()) < len(x.pair_dst)


def test_convert_refuses_existing_and_mixed_basis(ds_path, tmp_path):
    with pytest.raises(EgnnError, match="exists"):
        convert(RUNS[:1], ds_path)
    from egnn.basis import OrbitalBasis
    from egnn.dataset import _union_basis
    with pytest.raises(EgnnError, match="different shells"):
        _union_basis([OrbitalBasis.explicit({"O": "sp"}), OrbitalBasis.explicit({"O": "ssppd"})])
    with pytest.raises(EgnnError, match="not a directory|neither"):
        convert([RUNS[0], str(tmp_path / "missing")], str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_bad_dataset_version(ds_path, tmp_path):
    import shutil
    d = tmp_path / "old"
    shutil.copytree(ds_path, d)
    m = json.load(open(d / "manifest.json"))
    m["version"] = 99
    json.dump(m, open(d / "manifest.json", "w"))
    with pytest.raises(EgnnError, match="version 99"):
        Dataset(str(d))
