"""The package as pip builds it: kernels/ and comm/ install as egnn.kernels / egnn.comm only, and
egnn imports (and says so once) without its compiled extension."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and local state that a wheel build must not see (and must not race with).
_ANYWHERE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "out", "runs",
                                   ".pytest_cache", "results", ".gl", ".whl")
# top-level folders of generated data and local environments (gigabytes, written while tests run)
_TOP = {"data", ".fairchem1"}


def IGNORE(folder, names):
    return _ANYWHERE(folder, names) | (_TOP & set(names) if Path(folder) == ROOT else set())


def _run(cmd, cwd, env=None, timeout=300):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the shared checkout.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp, env=_env(EGNN_SKIP_EXT="1"))
    (whl,) = (tmp / "dist").glob("egnn-*.whl")
    return whl


def test_wheel_has_subpackages_and_no_top_level_kernels_or_comm(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "egnn/kernels/__init__.py" in names and "egnn/comm/__init__.py" in names
    assert "egnn/ops.py" in names and "egnn/_ext.py" in names
    # package data: the demo's CP2K runs and the pretrained checkpoints (`pretrained:hfo2_szv`, `pretrained:gete_dzvp`)
    assert "egnn/pretrained/hfo2_szv.pt" in names and "egnn/pretrained/gete_dzvp.pt" in names
    assert any(n.startswith("egnn/demo_data/hfo2_kp/") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"kernels", "comm", "csrc", "tests", "profiling"}, sorted(tops)
    assert tops - {"egnn"} == {n for n in tops if n.endswith(".dist-info")}, sorted(tops)


def test_installed_wheel_imports_egnn_kernels_and_comm(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
         cwd=tmp_path, env=_env())
    assert not (target / "kernels").exists() and not (target / "comm").exists()
    code = ("import importlib.util, egnn, egnn.kernels, egnn.comm, egnn.ops; "
            "print(egnn.__file__); print(egnn.kernels.__file__); print(egnn.comm.__file__); "
            "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('comm'))")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = _run([sys.executable, "-c", code], cwd=cwd, env=_env(PYTHONPATH=str(target))).stdout.split("\n")
    assert out[0] == str(target / "egnn" / "__init__.py")
    assert out[1] == str(target / "egnn" / "kernels" / "__init__.py")
    assert out[2] == str(target / "egnn" / "comm" / "__init__.py")
    assert out[3] == "None None"


def test_editable_install_maps_subpackages_to_the_checkout(tmp_path):
    code = ("import importlib.util, egnn.kernels, egnn.comm; print(egnn.kernels.__file__); print(egnn.comm.__file__); "
            "k, c = importlib.util.find_spec('kernels'), importlib.util.find_spec('comm'); "
            "print([s.origin for s in (k, c) if s is not None])")
    out = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env()).stdout.split("\n")
    assert out[0] == str(ROOT / "kernels" / "__init__.py")
    assert out[1] == str(ROOT / "comm" / "__init__.py")
    # no top-level kernels/comm from this checkout (a PyPI `comm`, a Jupyter dependency, may exist)
    assert str(ROOT) not in out[2], out[2]


BLOCKED = r"""
import importlib.abc, sys

class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "egnn._C":
            raise ImportError("egnn._C blocked by the test")

sys.meta_path.insert(0, NoExtension())
import torch
import egnn, egnn.ops as ops, egnn._ext as ext
assert not ext.AVAILABLE
assert ext.require("another op") is False
x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
i = torch.tensor([3, 3, 9, 0])
assert torch.equal(ops.halo_pack(x, i), x[i])
b = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
assert torch.equal(ops.halo_unpack_add(x, i, b), x.index_add(0, i, b))
assert torch.equal(ops.halo_unpack(x, b[:2], 8)[8:], b[:2])
assert torch.autograd.gradcheck(lambda x, b: ops.halo_unpack_add(ops.halo_unpack(x, b[:2], 8), i, b), (x, b))
print("ok")
"""


def test_missing_extension_falls_back_and_logs_once(tmp_path):
    res = _run([sys.executable, "-c", BLOCKED], cwd=tmp_path, env=_env())
    assert res.stdout.strip() == "ok"
    lines = [ln for ln in res.stderr.splitlines() if "egnn._C extension not available" in ln]
    assert len(lines) == 1, res.stderr
    assert "blocked by the test" in lines[0] and "pip install --no-build-isolation -e ." in lines[0]
