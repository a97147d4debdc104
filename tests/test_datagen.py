"""egnn.datagen: deterministic structure families and CP2K inputs like the shipped runs (no CP2K needed)."""
import glob
import os
import sys

import numpy as np
import pytest

from egnn import datagen
from egnn.cli import main
from egnn import EgnnError
from egnn.errors import ConfigError
from egnn.io.cp2k import parse_inp

SHIPPED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "egnn", "demo_data", "hfo2_kp", "*")))[0]


def _settings(text):
    """The lines of a CP2K input that are settings (neither coordinates, cell rows nor names)."""
    skip = ("PROJECT", "A [", "B [", "C [")
    out = []
    in_coord = False
    for line in text.splitlines():
        s = line.strip()
        in_coord = (in_coord or s == "&COORD") and s != "&END COORD"
        if not in_coord and not s.startswith(skip):
            out.append(s)
    return out


def test_inputs_have_the_shipped_settings(tmp_path):
    fam = datagen.select(["hfo2"], ["hfo2_m12_d05"])[0]
    atoms = datagen.make_structure(fam, 0)
    text = datagen.cp2k_input(atoms, "x", fam.basis, fam.kpoints)
    inp = glob.glob(os.path.join(SHIPPED, "*.inp"))[0]
    assert _settings(text) == _settings(open(inp).read())
    path = tmp_path / "x.inp"
    path.write_text(text)
    parsed = parse_inp(str(path))
    assert parsed.symbols == atoms.get_chemical_symbols()
    np.testing.assert_allclose(parsed.positions, atoms.positions, atol=1e-9)
    np.testing.assert_allclose(parsed.cell, atoms.cell[:], atol=1e-9)


def test_gamma_inputs_write_text_matrices():
    text = datagen.cp2k_input(datagen.prototype("hfo2_m12"), "x", "SZV", None)
    assert "&KPOINTS" not in text and "BINARY F" in text and "REAL_SPACE F" in text and "THRESHOLD 0" in text


def _mesh(m):
    """Monkhorst-Pack points along one axis, as exact fractions in [0, 1)."""
    from fractions import Fraction

    return {Fraction(2 * i - m - 1, 2 * m) % 1 for i in range(1, m + 1)}


@pytest.mark.parametrize("mesh,supercell", [((2, 2, 2), (2, 2, 2)), ((2, 2, 2), (1, 1, 2)), ((2, 2, 2), (2, 1, 1)),
                                            ((4, 4, 4), (2, 1, 1)), ((3, 6, 4), (3, 2, 4)), ((5, 1, 2), (1, 1, 1))])
def test_folded_kpoints_sample_the_prototype_mesh(mesh, supercell):
    """Unfolding: the supercell at K samples the prototype's k = (K + j) / n, j = 0..n-1, per axis.
    Those points must be exactly the prototype's Monkhorst-Pack mesh, each once."""
    from fractions import Fraction

    pts = datagen.folded_kpoints(mesh, supercell)
    assert len(pts) == len(set(pts)) == np.prod(mesh) // np.prod(supercell)
    for ax, (m, n) in enumerate(zip(mesh, supercell)):
        ks = {Fraction(p[ax]).limit_denominator(1000) for p in pts}
        assert all(-Fraction(1, 2) < k <= Fraction(1, 2) for k in ks)
        unfolded = [(k + j) / n % 1 for k in ks for j in range(n)]
        assert sorted(unfolded) == sorted(_mesh(m))


def test_folded_kpoints_need_a_divisible_mesh():
    with pytest.raises(ConfigError, match="not a multiple of supercell"):
        datagen.folded_kpoints((2, 2, 2), (3, 1, 1))


def test_supercells_run_on_the_folded_points(tmp_path):
    """Every family of the plans samples its prototype's mesh: cells of the prototype size keep CP2K's
    MONKHORST-PACK mesh (inputs as before), supercells list the folded points (SCHEME GENERAL), which
    egnn's reader gives back for the band figures."""
    sizes = set()
    for fam in datagen.select(["hfo2", "gete"]):
        atoms = datagen.make_structure(fam, fam.seeds[0])
        text = datagen.cp2k_input(atoms, "x", fam.basis, fam.kpoints, fam.supercell)
        assert fam.kpoints is not None, f"{fam.name}: Γ only is a different sampling from the other families"
        path = tmp_path / f"{fam.name}.inp"
        path.write_text(text)
        parsed = parse_inp(str(path))
        if fam.supercell == (1, 1, 1):
            assert parsed.kpoint_mesh == fam.kpoints and parsed.kpoint_list is None
        else:
            assert "SCHEME GENERAL" in text and parsed.kpoint_mesh is None
            np.testing.assert_array_equal(parsed.kpoint_list, datagen.folded_kpoints(fam.kpoints, fam.supercell))
            sizes.add(len(parsed.kpoint_list))
    assert sizes == {1, 4}  # 2x2x2 onto (2,2,2): (1/2,1/2,1/2); onto (1,1,2) or (2,1,1): four points


@pytest.mark.parametrize("name", ["hfo2_m12_strain", "hfo2_m24_val", "gete_rs8_d20"])
def test_structures_are_deterministic_and_physical(name):
    fam = datagen.select(["hfo2", "gete"], [name])[0]
    a, b = datagen.make_structure(fam, 1), datagen.make_structure(fam, 1)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.cell[:], b.cell[:])
    base = datagen.prototype(fam.proto).repeat(fam.supercell)
    assert len(a) == len(base)
    # the displacement has the family's σ (positions relative to the strained, unrattled cell)
    frac = base.get_scaled_positions(wrap=False)
    disp = a.positions - frac @ a.cell[:]
    assert 0.6 * fam.sigma < disp.std() < 1.4 * fam.sigma
    strain = np.linalg.solve(base.cell[:], a.cell[:]) - np.eye(3)
    assert np.abs(strain).max() <= fam.strain + 1e-12
    if fam.strain:
        assert np.abs(strain).max() > 0.2 * fam.strain
    d = a.get_all_distances(mic=True)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.7 * datagen._min_distance(base) - 1e-9
    assert not np.allclose(datagen.make_structure(fam, 2).positions, a.positions)


def test_families_are_disjoint_and_validation_is_held_out():
    fams = datagen.select(["hfo2", "gete"])
    names = [f.run_name(s) for f in fams for s in f.seeds]
    assert len(names) == len(set(names))
    assert len({f.salt for f in fams}) == len(fams)
    for plan in ("hfo2", "gete"):
        roles = {f.role for f in datagen.PLANS[plan]}
        assert roles == {"train", "val"}
        sig_val = max(f.sigma for f in datagen.PLANS[plan] if f.role == "val")
        sig_train = np.array([f.sigma for f in datagen.PLANS[plan] if f.role == "train" for _ in f.seeds])
        # the goals are on held-out cells that displace more than most training cells
        assert (sig_train < sig_val).mean() > 0.75


def test_cli_dry_run_and_resume(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["data", "generate", "gete", "-o", str(out), "--family", "gete_rs8_val", "--dry-run"]) == 0
    runs = sorted(os.listdir(out / "gete_rs8_val"))
    assert runs == [f"gete_rs8_val_s{k:04d}" for k in datagen.select(["gete"], ["gete_rs8_val"])[0].seeds]
    run = out / "gete_rs8_val" / runs[0]
    assert (run / f"{runs[0]}.inp").is_file() and (run / f"{runs[0]}.xyz").is_file()
    assert not datagen.is_complete(str(run), runs[0])
    # a finished run (CP2K's closing line and both matrices) is skipped by the next call
    (run / f"{runs[0]}.out").write_text("...\n  **** PROGRAM ENDED AT  2026-12-04\n")
    for m in ("KS", "S"):
        (run / f"{runs[0]}-{m}_SPIN_1_R_1-1_0.csr.gz").write_bytes(b"")
    assert datagen.is_complete(str(run), runs[0])
    rows = datagen.run_family(datagen.select(["gete"], ["gete_rs8_val"])[0], str(out / "gete_rs8_val"),
                              dry_run=True, log=lambda *_: None)
    assert rows[0]["status"] == "done earlier" and rows[1]["status"] == "input written"
    assert "gete_rs8_val" in (out / "plan.json").read_text()
    # a run an older plan made (another input) is not complete for this one: it is made again
    inp = run / f"{runs[0]}.inp"
    inp.write_text(inp.read_text().replace("MONKHORST-PACK 2 2 2", "MONKHORST-PACK 2 2 1"))
    assert datagen.is_complete(str(run), runs[0]) and not datagen.is_complete(str(run), runs[0], inp.read_text()[1:])
    rows = datagen.run_family(datagen.select(["gete"], ["gete_rs8_val"])[0], str(out / "gete_rs8_val"),
                              dry_run=True, log=lambda *_: None)
    assert rows[0]["status"] == "input written" and "MONKHORST-PACK 2 2 2" in inp.read_text()
    assert not (run / f"{runs[0]}.out").exists()


def test_unknown_plan_or_family():
    with pytest.raises(ConfigError, match="unknown plan"):
        datagen.select(["nope"])
    with pytest.raises(ConfigError, match="hfo2_m12_d05"):
        datagen.select(["hfo2"], ["hfo2_m12_d99"])


@pytest.mark.parametrize("plan,config", [("hfo2", "hfo2_szv_full.yaml"), ("gete", "gete_dzvp_full.yaml")])
def test_full_configs_never_see_the_held_out_families(plan, config):
    """The held-out figures of README "Accuracy" mean something only if no training or validation
    path of the full config can match a validation family's runs, and if every training family of
    the plan is in the config (a family generated but forgotten is CPU time thrown away)."""
    import fnmatch
    import sys

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = yaml.safe_load(open(os.path.join(root, "configs", config)))
    patterns = [os.path.basename(p) for split in ("train", "val") for p in cfg["data"][split] or []]
    fams = datagen.PLANS[plan]
    for fam in fams:
        runs = [fam.run_name(s) for s in fam.seeds]
        hit = [p for p in patterns if any(fnmatch.fnmatch(r, p) for r in runs)]
        if fam.role == "val":
            assert not hit, f"{config} trains or validates on held-out {fam.name}: {hit}"
        else:
            assert all(any(fnmatch.fnmatch(r, p) for p in patterns) for r in runs), f"{config} misses {fam.name}"
    # the accuracy splits of profiling/accuracy_splits.py read the plan's validation families
    sys.path.insert(0, os.path.join(root, "profiling"))
    import accuracy_splits as A

    name, splits, _ = A.material({"hfo2": ["Hf", "O"], "gete": ["Te", "Ge"]}[plan])
    assert name == plan
    val = {f.name for f in fams if f.role == "val"}
    generated = [sp.folder for sp in splits.values() if sp.root == A.GEN]
    assert generated and set(generated) <= val
    # and --fit's rows only training families
    assert {sp.folder for sp in A.FIT_SPLITS[plan].values()} <= {f.name for f in fams if f.role != "val"}
    with pytest.raises(EgnnError, match="no accuracy splits"):
        A.material(["Si"])


FAKE_CP2K = """#!{python}
# a stand-in for cp2k.psmp: writes what a finished run leaves (the closing line, KS and S files) and
# records how many runs were under way when it started; FAIL names a project that exits 1
import os, sys, time
name = sys.argv[sys.argv.index("-i") + 1][:-4]
live = os.environ["FAKE_LIVE"]
mark = os.path.join(live, name)
open(mark, "w").close()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(f"{{name}} {{len(os.listdir(live))}}\\n")
time.sleep(0.5)
os.remove(mark)
if name == os.environ.get("FAIL"):
    sys.exit(1)
with open(name + ".out", "w") as f:
    f.write("  *** SCF run converged in     7 steps ***\\n  **** PROGRAM ENDED AT  2026-12-04\\n")
for m in ("KS", "S"):
    open(f"{{name}}-{{m}}_SPIN_1_R_1-1_0.csr", "w").write("1 1 1.0\\n")
"""


@pytest.fixture
def fake_cp2k(tmp_path, monkeypatch):
    bin_dir, live = tmp_path / "bin", tmp_path / "live"
    bin_dir.mkdir()
    live.mkdir()
    exe = bin_dir / "cp2k.psmp"
    exe.write_text(FAKE_CP2K.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LIVE", str(live))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "starts.log"))
    return tmp_path / "starts.log"


def test_jobs_run_structures_side_by_side_and_resume(tmp_path, fake_cp2k):
    out = tmp_path / "gen"
    assert main(["data", "generate", "gete", "-o", str(out), "--family", "gete_rs8_val", "--family",
                 "gete_rs64_val", "--np", "1", "--jobs", "3"]) == 0
    fams = datagen.select(["gete"], ["gete_rs8_val", "gete_rs64_val"])
    names = [f.run_name(s) for f in fams for s in f.seeds]
    starts = dict(line.split() for line in fake_cp2k.read_text().splitlines())
    assert sorted(starts) == sorted(names)  # every structure ran once, across both families
    assert max(int(n) for n in starts.values()) == 3  # three at a time, never more
    for f in fams:
        rows = (out / f.name / "timings.csv").read_text().splitlines()
        assert rows[0].startswith("structure,") and sorted(r.split(",")[0] for r in rows[1:]) == \
            [f.run_name(s) for s in f.seeds]
        for s in f.seeds:
            run = out / f.name / f.run_name(s)
            assert datagen.is_complete(str(run), f.run_name(s)) and (run / f"{f.run_name(s)}.xyz").is_file()
    rows = datagen.run_families([(f, str(out / f.name)) for f in fams], np_ranks=1, jobs=2, log=lambda *_: None)
    assert [r["structure"] for r in rows] == names and {r["status"] for r in rows} == {"done earlier"}


def test_a_failed_run_stops_the_rest_and_names_its_folder(tmp_path, fake_cp2k, monkeypatch):
    fam = datagen.select(["gete"], ["gete_rs8_val"])[0]
    monkeypatch.setenv("FAIL", fam.run_name(fam.seeds[1]))
    out = tmp_path / "gen"
    with pytest.raises(EgnnError, match=f"{fam.run_name(fam.seeds[1])}: CP2K failed"):
        datagen.run_families([(fam, str(out))], np_ranks=1, jobs=2, log=lambda *_: None)
    started = fake_cp2k.read_text().split()[::2]
    failed = fam.run_name(fam.seeds[1])
    assert failed in started and len(started) < len(fam.seeds)  # runs not yet started were cancelled
    assert all(datagen.is_complete(str(out / n), n) for n in started if n != failed)  # those under way finished
    assert not datagen.is_complete(str(out / failed), failed)
    with pytest.raises(ConfigError, match="--jobs"):
        datagen.run_families([(fam, str(out))], jobs=0)
