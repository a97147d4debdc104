"""The pretrained checkpoints shipped in egnn/pretrained (`pretrained:hfo2_szv`, `pretrained:gete_dzvp`):
each loads as weights only, carries its model card, and predicts a real CP2K run it was trained on to
the accuracy its card states; `egnn.checkpoint.export` writes such files."""
import os

import pytest
import torch

from egnn import checkpoint
from egnn.errors import InputError
from egnn.train import model_from_checkpoint

HERE = os.path.dirname(__file__)
# name -> (elements, a real CP2K run in its training data (shared hfo2_kp s0000 / gete_kp s0003), the
# bounds of overall and node MAE in meV there: its training figures with margin)
SHIPPED = {
    "hfo2_szv": (["Hf", "O"], os.path.join(HERE, "..", "egnn", "demo_data", "hfo2_kp", "hfo2_m12_rattled_s0000"),
                 4.0, 25.0),
    "gete_dzvp": (["Ge", "Te"], os.path.join(HERE, "fixtures", "cp2k", "gete_rs8_rattled_s0003"), 0.6, 1.5),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_loads_as_weights_only_with_its_card(name):
    path = checkpoint.resolve(f"pretrained:{name}")
    assert os.path.getsize(path) < 8 * 2**20  # a few MB: float32 weights only, no optimizer state
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ck) == {"format", "model_config", "model", "epoch", "card"}
    card = ck["card"]
    for key in ("trained_on", "held_out", "limits", "elements", "basis", "r_cut"):
        assert key in card, key
    assert card["elements"] == SHIPPED[name][0] and ck["model_config"]["r_cut"] == card["r_cut"]
    assert sorted(n[:-3] for n in os.listdir(os.path.dirname(path))) == sorted(SHIPPED)
    with pytest.raises(InputError, match="no shipped checkpoint"):
        checkpoint.resolve("pretrained:nope")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_predicts_a_real_run(name, tmp_path):
    from egnn.evaluate import evaluate
    from egnn.train import open_datasets

    _, run, mae, node = SHIPPED[name]
    model = model_from_checkpoint(f"pretrained:{name}")
    r = evaluate(model, open_datasets([run], float(model.config.r_cut), str(tmp_path / "cache")))
    assert r["mae_meV"] < mae and r["mae_node_meV"] < node


def test_export_keeps_the_model_and_drops_the_training_state(tmp_path):
    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig

    torch.manual_seed(0)
    m = HamiltonianModel(ModelConfig(basis=OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH"),
                                     r_cut=5.0, lmax=4, mmax=2, channels=4, layers=1, heads=1, hidden=8, num_rbf=4))
    src = str(tmp_path / "train.pt")
    raw = {k: v + 1 if v.is_floating_point() else v for k, v in m.state_dict().items()}  # train.ema_decay runs
    checkpoint.save(src, {"format": checkpoint.FORMAT, "model_config": m.config.to_dict(), "model": m.state_dict(),
                          "model_train": raw, "ema_steps": 3, "optimizer": {"state": {}, "lr": 1e-3}, "epoch": 7})
    out = checkpoint.export(src, str(tmp_path / "ship.pt"), {"trained_on": "nothing"})
    ck = torch.load(out, weights_only=True)
    assert "optimizer" not in ck and "model_train" not in ck and ck["epoch"] == 7 and ck["card"] == {"trained_on": "nothing"}
    got = model_from_checkpoint(out).state_dict()
    assert all(torch.equal(got[k], v.float() if v.is_floating_point() else v) for k, v in m.state_dict().items())
