"""Trust and failure: every file egnn reads or writes, attacked and damaged on purpose.

Each case builds its corrupted input on the fly (from the shipped CP2K fixtures), asserts the error
class, that the message names the file or field, and that nothing is left under a final name."""
import glob
import gzip
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from egnn.cli import main
from egnn.errors import ConfigError, InputError, TrainingError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
KP = os.path.join(FIX, "hfo2_m12_rattled_s0000")  # real-space images, binary .csr.gz
GAMMA = os.path.join(FIX, "hfo2_m12_szv")  # Γ only, text .csr.gz


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def csr_text(path):
    with gzip.open(path, "rt") as fh:
        return fh.read()


def write_text(path, text):
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def small_model(r_cut=5.0):
    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig

    torch.manual_seed(0)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    return HamiltonianModel(ModelConfig(basis=basis, r_cut=r_cut, lmax=4, mmax=2, channels=4, layers=1, heads=1,
                                        hidden=8, num_rbf=8)).eval()


@pytest.fixture
def checkpoint(tmp_path):
    from egnn import checkpoint as ck

    m = small_model()
    path = str(tmp_path / "ck.pt")
    ck.save(path, {"format": ck.FORMAT, "model_config": m.config.to_dict(), "model": m.state_dict()})
    return path


# ----------------------------------------------------------------------------- 1. checkpoints never run code
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path, checkpoint, capsys):
    from egnn.checkpoint import model_from_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "egnn-checkpoint-1", "model_config": {}, "model": {}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(InputError, match="evil.pt") as exc:
        model_from_checkpoint(str(evil))
    assert "never runs code" in str(exc.value)
    assert main(["predict", "--checkpoint", str(evil), KP, "-o", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert model_from_checkpoint(checkpoint) is not None  # egnn's own checkpoints load as weights only


def test_trainer_checkpoints_are_plain_data(tmp_path):
    from egnn import checkpoint as ck

    with pytest.raises(InputError, match="cannot go into a checkpoint"):
        ck.save(str(tmp_path / "x.pt"), {"format": ck.FORMAT, "bad": object()})
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.tmp").exists()
    ck.save(str(tmp_path / "y.pt"), {"format": ck.FORMAT, "n": np.float32(2.5), "a": np.arange(3)})
    back = torch.load(tmp_path / "y.pt", weights_only=True)
    assert back["n"] == 2.5 and torch.equal(back["a"], torch.arange(3))


def test_nan_weights_in_a_checkpoint_are_refused(tmp_path):
    from egnn import checkpoint as ck

    m = small_model()
    sd = m.state_dict()
    sd["node_embed.weight"][0, 0] = float("nan")
    path = str(tmp_path / "nan.pt")
    ck.save(path, {"format": ck.FORMAT, "model_config": m.config.to_dict(), "model": sd})
    with pytest.raises(InputError, match="NaN"):
        ck.model_from_checkpoint(path)


# ----------------------------------------------------------------------------- 2. --force never deletes inputs
def test_convert_force_never_deletes_inputs_or_foreign_folders(tmp_path, monkeypatch):
    run = copy_run(GAMMA, tmp_path)
    before = sorted(os.listdir(run))
    for out in (run, tmp_path):  # the input itself; a folder holding the input
        assert main(["data", "convert", str(run), "-o", str(out), "--force", "--r-cut", "6"]) == 2
    assert sorted(os.listdir(run)) == before
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["data", "convert", str(run), "-o", ".", "--force", "--r-cut", "6"]) == 2  # the working directory
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="only a dataset folder egnn wrote"):
        from egnn.dataset import convert

        convert([str(run)], str(foreign), r_cut=6.0, force=True)
    assert (foreign / "keep.txt").exists() and (work / "notes.txt").exists()
    ds = tmp_path / "ds"
    assert main(["data", "convert", str(run), "-o", str(ds), "--r-cut", "6"]) == 0
    assert main(["data", "convert", str(run), "-o", str(ds), "--force", "--r-cut", "6"]) == 0  # egnn's own: replaced
    assert not glob.glob(str(tmp_path / "*.part"))


def test_convert_output_problems_are_found_before_work(tmp_path):
    from egnn.dataset import convert

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        convert([GAMMA], str(f))
    with pytest.raises(InputError, match="cannot create"):
        convert([GAMMA], str(f / "sub"))


# ----------------------------------------------------------------------------- 3. corrupt DFT files
def _gamma_csr(run, kind="KS"):
    return glob.glob(str(run / f"*-{kind}_SPIN_1-1_0.csr.gz"))[0]


@pytest.mark.parametrize("case,match", [
    ("cut_in_number", "no newline"),
    ("cut_at_record", "diagonal|differ"),
    ("huge_value", "beyond any physical"),
    ("nan_value", "not finite"),
    ("asymmetric", "differ by"),
])
def test_corrupt_text_csr(tmp_path, case, match):
    from egnn.io.cp2k import read_run

    run = copy_run(GAMMA, tmp_path)
    path = _gamma_csr(run)
    text = csr_text(path)
    lines = text.splitlines(keepends=True)
    if case == "cut_in_number":
        text = text[:len(text) - 9]
    elif case == "cut_at_record":
        text = "".join(lines[:len(lines) // 2])
    elif case in ("huge_value", "nan_value"):
        i, j, _ = lines[10].split()
        lines[10] = f"{i:>8s}{j:>8s}{'1.0E+300' if case == 'huge_value' else 'NaN':>23s}\n"
        text = "".join(lines)
    else:
        i, j, v = lines[7].split()
        lines[7] = f"{i:>8s}{j:>8s}{float(v) + 0.5:23.14E}\n"
        text = "".join(lines)
    write_text(path, text)
    with pytest.raises(InputError, match=match) as exc:
        read_run(str(run))
    assert os.path.basename(path) in str(exc.value)


def test_empty_r0_image_and_unnormalised_s(tmp_path):
    from egnn.io.cp2k import read_run

    run = copy_run(KP, tmp_path)
    r0 = glob.glob(str(run / "*-KS_SPIN_1_R_1-1_0.csr.gz"))[0]
    write_text(r0, "")
    with pytest.raises(InputError, match="R = 0 KS matrix is empty") as exc:
        read_run(str(run))
    assert "R_1-1_0" in str(exc.value)


def test_indefinite_overlap_is_refused(tmp_path):
    from egnn.io.cp2k import read_run

    run = copy_run(GAMMA, tmp_path)
    path = _gamma_csr(run, "S")
    M = {}
    for ln in csr_text(path).splitlines():
        i, j, v = ln.split()
        M[int(i), int(j)] = float(v)
    for (a, b), v in {(1, 2): 1.0, (1, 3): 1.0, (2, 3): -1.0}.items():  # [[1,1,1],[1,1,-1],[1,-1,1]]: eigenvalue -1
        M[a, b] = M[b, a] = v
    for k in (1, 2, 3):
        M[k, k] = 1.0
    write_text(path, "".join(f"{i:8d}{j:8d}{v:23.14E}\n" for (i, j), v in sorted(M.items())))
    with pytest.raises(InputError, match="not positive definite") as exc:
        read_run(str(run))
    assert os.path.basename(path) in str(exc.value)


def test_training_stops_on_a_non_finite_loss(tmp_path, monkeypatch):
    from egnn import train as T

    cfg = T.load_config({"data": {"train": [KP], "val": [], "r_cut": 5.0},
                         "model": {"lmax": 4, "mmax": 2, "channels": 4, "layers": 1, "heads": 1, "hidden": 8,
                                   "num_rbf": 8},
                         "train": {"epochs": 3, "checkpoint_every": 1, "lr": 1e-3},
                         "output": str(tmp_path / "run"), })
    cfg.data["cache"] = str(tmp_path / "cache")
    real = T.Trainer.compute

    def poisoned(self, s):
        loss, st = real(self, s)
        return (loss * float("nan") if self.epoch >= 1 else loss), st

    monkeypatch.setattr(T.Trainer, "compute", poisoned)
    with pytest.raises(TrainingError, match="epoch 2.*loss is nan"):
        T.train_from_config(cfg, progress=False)
    ck = T.load_checkpoint(str(tmp_path / "run" / "last.pt"))  # epoch 1's finite weights, nothing later
    assert ck["epoch"] == 1


# ----------------------------------------------------------------------------- 4. the cache notices change
def test_cache_is_keyed_on_content_locked_and_repaired(tmp_path, caplog):
    from egnn.train import open_datasets

    run = copy_run(KP, tmp_path)
    cache = str(tmp_path / "cache")
    first = open_datasets([str(run)], 5.0, cache)[0]
    h0, m = first[0].node_target.clone(), first[0].node_mask
    r0 = glob.glob(str(run / "*-KS_SPIN_1_R_1-1_0.csr.gz"))[0]  # scale H(R=0) by 1.5: a new key, a new conversion
    with gzip.open(r0, "rb") as fh:
        rec = np.frombuffer(fh.read(), dtype=[("m1", "<i4"), ("i", "<i4"), ("j", "<i4"), ("v", "<f8"), ("m2", "<i4")])
    rec = rec.copy()
    rec["v"] *= 1.5
    with gzip.open(r0, "wb") as fh:
        fh.write(rec.tobytes())
    second = open_datasets([str(run)], 5.0, cache)[0]
    assert second.path != first.path and not os.path.exists(first.path)  # the stale entry is pruned
    assert torch.allclose(second[0].node_target[m], 1.5 * h0[m], rtol=1e-6)
    # a damaged cached file is rebuilt, with a log line
    victim = os.path.join(second.path, second.manifest["structures"][0]["file"])
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    with caplog.at_level("WARNING", logger="egnn"):
        third = open_datasets([str(run)], 5.0, cache)[0]
    assert third.path == second.path and "damaged" in caplog.text
    assert torch.equal(third[0].node_target, second[0].node_target)
    # concurrent trainings on the same data: one converts, the other waits and reuses
    fresh = str(tmp_path / "cache2")
    got, errs = [], []

    def go():
        try:
            got.append(open_datasets([str(run)], 5.0, fresh)[0].path)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errs.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and len(set(got)) == 1


def test_data_info_finds_a_damaged_dataset(tmp_path):
    ds = tmp_path / "ds"
    assert main(["data", "convert", GAMMA, "-o", str(ds), "--r-cut", "6"]) == 0
    f = ds / "s00000.npz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="s00000.npz"):
        from egnn.dataset import info

        info(str(ds))
    assert main(["data", "info", str(ds)]) == 2


# ----------------------------------------------------------------------------- 5. geometry edge cases
def test_geometry_edge_cases_fail_fast_and_clearly(tmp_path, checkpoint):
    from ase import Atoms
    from ase.build import bulk

    from egnn.graph import radius_graph

    flat = Atoms("Si2", positions=[[0, 0, 0], [1, 1, 0]], cell=[[5, 0, 0], [0, 5, 0], [0, 0, 1e-9]], pbc=True)
    far = bulk("Si", "diamond", 5.43)
    far.positions[0, 0] += 5.43 * 2000
    huge = bulk("Si", "diamond", 5.43)
    huge.translate([1e12, 0, 0])
    for atoms, match in ((flat, "nearly flat"), (far, "cells from the cell"), (huge, "1e\\+12 Å")):
        with pytest.raises(InputError, match=match):
            radius_graph(atoms, 5.0)


def test_a_molecule_without_a_cell_predicts_every_format(tmp_path, checkpoint):
    from ase import Atoms

    mol = Atoms("HfO2", positions=[[0, 0, 0], [1.9, 0.3, 0], [-1.2, 1.5, 0.2]])
    path = tmp_path / "mol.xyz"
    mol.write(path)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", checkpoint, str(path), "-o", str(out), "--format", "rows,gamma,npz,cp2k"]) == 0
    names = sorted(os.listdir(out))
    assert "mol_H.npz" in names and "mol-KS_SPIN_1_R_1-1_0.csr" in names and "mol_H.rows" in names


def test_two_inputs_all_or_nothing(tmp_path, checkpoint):
    from ase.build import bulk

    bad = bulk("HfO2", "fluorite", 5.1)
    bad.positions[0, 0] += 5.1 * 3000  # only the geometry check can tell
    p = tmp_path / "bad.xyz"
    bad.write(p)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", checkpoint, KP, str(p), "-o", str(out)]) == 2
    assert not out.exists() or os.listdir(out) == []


# ----------------------------------------------------------------------------- 6. validated before work
def _cfg(tmp_path, **sections):
    base = {"data": {"train": [KP], "r_cut": 5.0}, "output": str(tmp_path / "run")}
    base.update(sections)
    return base


@pytest.mark.parametrize("section,value,match", [
    ("train", {"lr": "fast"}, "train.lr must be a number > 0, got 'fast'"),
    ("train", {"seed": "abc"}, "train.seed must be an integer"),
    ("train", {"epochs": None}, "train.epochs must be a positive integer, got None"),
    ("train", {"device": "cuda"}, "no usable CUDA"),
    ("model", {"channels": "sixteen"}, "model.channels"),
    ("model", [1, 2], "'model' section must be a mapping"),
    ("train", "fast", "'train' section must be a mapping"),
])
def test_config_errors_name_the_field(tmp_path, section, value, match):
    from egnn.train import load_config

    if match == "no usable CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device cuda is valid here")
    with pytest.raises(ConfigError, match=match):
        load_config(_cfg(tmp_path, **{section: value}))
    assert not (tmp_path / "run").exists()


def test_config_reads_yaml_style_numbers(tmp_path):
    from egnn.train import load_config

    cfg = load_config(_cfg(tmp_path, train={"lr": "1e-3", "epochs": 5.0}, model={"channels": "8", "heads": 2}))
    assert cfg.train["lr"] == 1e-3 and cfg.train["epochs"] == 5 and cfg.model["channels"] == 8


def test_resume_mismatches_and_rerun_into_the_same_output(tmp_path):
    from egnn.train import load_config, train_from_config

    model = {"lmax": 4, "mmax": 2, "channels": 4, "layers": 1, "heads": 1, "hidden": 8, "num_rbf": 8}
    raw = _cfg(tmp_path, model=model, train={"epochs": 2, "checkpoint_every": 1})
    raw["data"]["cache"] = str(tmp_path / "cache")
    train_from_config(load_config(raw), progress=False)
    (tmp_path / "run" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="--overwrite"):
        train_from_config(load_config(raw), progress=False)
    last = str(tmp_path / "run" / "last.pt")
    with pytest.raises(ConfigError, match="epoch 2"):
        train_from_config(load_config(raw), resume=last, progress=False)
    wider = dict(raw, model=dict(model, channels=8))
    with pytest.raises(ConfigError, match="channels"):
        train_from_config(load_config(dict(wider, train={"epochs": 4})), resume=last, progress=False)
    train_from_config(load_config(raw), progress=False, overwrite=True)
    assert (tmp_path / "run" / "mine.txt").read_text() == "keep"  # --overwrite touches egnn's files only
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # not interleaved with the first run


DEAD_PEER = """
import os, sys, numpy as np, torch
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                  EGNN_DIST_TIMEOUT="20")
import torch.distributed as dist
from ase.build import bulk
from egnn.comm import HaloExchange, HaloPlan
from egnn.distributed import init_distributed
from egnn.errors import DistributedError
from egnn.graph import radius_graph

init_distributed()
g = radius_graph(bulk("Si", "diamond", 5.43).repeat((2, 1, 1)), 3.0)
parts = (g.positions[:, 0] > g.positions[:, 0].mean()).astype(np.int64)
plan = HaloPlan.build(g, parts, rank, 2)
ex = HaloExchange(plan, "torch")
dist.barrier()
if rank == 1:
    print("exited", flush=True)
    os._exit(0)  # dies without a word
try:
    ex(torch.zeros(plan.num_local, 4, 2))
    print("no error")
except DistributedError as exc:
    print("DistributedError:", exc)
"""


def test_a_dead_peer_is_a_distributed_error(tmp_path):
    """A rank that dies mid-exchange: the survivor gets DistributedError, not a raw gloo error."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "dead_peer.py"
    script.write_text(DEAD_PEER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ps = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env) for r in range(2)]
    out = [p.communicate(timeout=300) for p in ps]  # a hang guard: the survivor's own timeout is 20 s
    assert out[1][0].strip() == "exited", out[1][1][-2000:]
    assert out[0][0].startswith("DistributedError: halo exchange with ranks [1]"), out[0][1][-2000:]
