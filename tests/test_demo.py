"""`egnn demo` end to end (one epoch): checkpoint, evaluation, figures and predicted H on disk."""
import json
import os

import scipy.sparse as sp

from egnn.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--tile", "1x1x1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert os.path.isfile(summary["checkpoint"]) and summary["checkpoint"] == str(out / "checkpoint.pt")
    assert summary["train"]["epoch"] == 1 and summary["mae_meV"] > 0
    H = sp.load_npz(summary["prediction"])
    assert H.shape == (72, 72) and abs(H - H.T).max() < 1e-6  # 12 atoms, SZV; symmetric
    assert sorted(os.listdir(summary["plots"])) == ["H_vs_distance.png", "bands_hfo2_m12_rattled_s0005.png",
                                                   "error_violins.png", "logH_pred_vs_dft.png"]
    assert summary["band_mae_meV"] > 0
    assert "checkpoint" in capsys.readouterr().out
