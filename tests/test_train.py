"""egnn train: CLI smoke tests on the tiny fixtures, exact resume, loss masking, config errors."""
import json
import os

import pytest
import torch
import yaml

from egnn import EgnnError
from egnn.errors import ConfigError
from egnn.cli import main
from egnn.train import TRAIN_DEFAULTS, Sample, fit_output_stats, masked_loss

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
KP = os.path.join(FIX, "hfo2_m12_rattled_s0000")  # real-space images
GAMMA = os.path.join(FIX, "hfo2_m12_szv")  # Γ-only: targets are folded
TINY_MODEL = {"channels": 8, "layers": 1, "hidden": 8, "heads": 1, "num_rbf": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("egnn-cache"))


def write_config(path, cache, out, train=(KP,), val=(KP,), r_cut=5.0, **train_opts):
    cfg = {"data": {"train": list(train), "val": list(val), "r_cut": r_cut, "cache": cache},
           "model": TINY_MODEL, "train": {"epochs": 2, "lr": 3e-3, "seed": 3, **train_opts}, "output": str(out)}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_train_two_epochs_json_and_files(tmp_path, cache, capsys):
    cfg = write_config(tmp_path / "c.yaml", cache, tmp_path / "run")
    assert main(["train", cfg, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["epoch"] == 2 and result["train_structures"] == 1
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("train_loss", "val_loss", "val_node_mae_meV", "val_edge_mae_meV", "lr", "seconds"):
        assert all(key in x and x[key] == x[key] for x in lines)
    for f in ("best.pt", "last.pt", "config.json"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_continues_exactly(tmp_path, cache, capsys, ema):
    straight = write_config(tmp_path / "a.yaml", cache, tmp_path / "a", epochs=3, checkpoint_every=1, ema_decay=ema)
    main(["train", straight, "--json"])
    ref = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    first = write_config(tmp_path / "b.yaml", cache, tmp_path / "b", epochs=1, ema_decay=ema)
    main(["train", first, "--json"])
    main(["train", first, "--json", "--epochs", "3", "--resume", str(tmp_path / "b" / "last.pt")])
    got = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["epoch"] for x in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


def test_weight_average_is_the_warmed_up_ema():
    from egnn.train import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema, decay = WeightAverage(0.8), 0.8
    expect = None
    for n in range(40):  # past the warm-up: the decay reaches 0.8 at n = 36
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        now = [p.detach().clone() for p in model.parameters()]
        if expect is None:
            expect = now
        else:
            d = min(decay, (1 + n) / (10 + n))  # n updates before this one
            expect = [d * e + (1 - d) * w for e, w in zip(expect, now)]
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.applied(model):
        for p, e in zip(model.parameters(), expect):
            torch.testing.assert_close(p, e)
    for p, r in zip(model.parameters(), raw):  # the training weights are back
        assert torch.equal(p, r)


def test_ema_checkpoint_carries_the_averaged_weights_that_were_validated(tmp_path, cache, capsys):
    from egnn.train import Trainer, load_config, load_samples, open_datasets
    from egnn.checkpoint import load, model_from_checkpoint

    cfg = write_config(tmp_path / "e.yaml", cache, tmp_path / "e", epochs=2, checkpoint_every=1, ema_decay=0.95)
    assert main(["train", cfg, "--json"]) == 0
    ck = load(str(tmp_path / "e" / "last.pt"))
    assert ck["ema_steps"] == 2  # one structure, two epochs
    moved = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, ck["model_train"][k])]
    assert moved  # the averaged weights are not the raw ones
    # the logged validation loss is the one of the averaged weights ("model", what evaluate/predict read)
    last = [json.loads(x) for x in open(tmp_path / "e" / "metrics.jsonl")][-1]
    tc = load_config(cfg)
    model = model_from_checkpoint(str(tmp_path / "e" / "last.pt"))
    samples = load_samples(open_datasets(tc.data["val"], tc.r_cut, cache), model.basis)
    got = Trainer(model, [], samples, {**TRAIN_DEFAULTS, **tc.train}, str(tmp_path / "x")).evaluate(samples)
    assert got["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_gamma_only_structure_trains_on_folded_targets(tmp_path, cache, capsys):
    cfg = write_config(tmp_path / "g.yaml", cache, tmp_path / "g", train=(GAMMA,), val=(GAMMA,), r_cut=6.0, epochs=1)
    assert main(["train", cfg, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_edge_mae_meV"] > 0 and result["val_loss"] == result["val_loss"]


def test_loss_ignores_padded_elements():
    torch.manual_seed(0)
    pred = torch.randn(5, 9, 4, requires_grad=True)
    target = torch.randn(5, 9, 4)
    mask = torch.rand(5, 9, 4) > 0.4
    loss, _, n = masked_loss(pred, target, mask)
    garbage = target.clone()
    garbage[~mask] = 1e6
    loss2, _, _ = masked_loss(pred, garbage, mask)
    assert n == int(mask.sum()) and loss.item() == loss2.item()
    loss.backward()
    assert pred.grad[~mask].abs().max() == 0 and pred.grad[mask].abs().min() > 0


def test_output_stats_center_node_scalars():
    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig

    basis = OrbitalBasis.explicit({"Si": "sp", "C": "sp"})
    m = HamiltonianModel(ModelConfig(basis=basis, lmax=2, mmax=2, channels=4, layers=1, hidden=4))
    N, K, C = 6, 9, m.node_shift.shape[1]
    species = torch.tensor([0, 0, 1, 1, 1, 0])
    t = torch.randn(N, K, C)
    t[:, 0, 0] += torch.where(species == 0, -10.0, 5.0)
    s = Sample("x", species, torch.tensor([1]), torch.tensor([0]), torch.ones(1, 3), t, torch.ones(N, K, C, dtype=torch.bool),
               torch.randn(1, K, m.edge_scale.shape[1]), torch.ones(1, K, m.edge_scale.shape[1], dtype=torch.bool))
    fit_output_stats(m, [s])
    assert m.node_shift[0, 0].item() == pytest.approx(t[species == 0, 0, 0].mean().item(), rel=1e-6)
    assert m.node_shift[1, 0].item() == pytest.approx(t[species == 1, 0, 0].mean().item(), rel=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"bogus": 1}, "unknown top-level"),
    ({"train": {"epochs": 1, "learning_rate": 1}}, r"unknown key\(s\) train"),
    ({"model": {"lmaxx": 2}}, r"unknown key\(s\) model"),
    ({"data": {"train": ["/nonexistent/run"], "r_cut": 5.0}}, "does not exist"),
    ({"data": {"train": [KP], "r_cut": 3.0}}, "captures only"),
    ({"train": {"amp": "fp16"}}, "fp16 needs a CUDA"),
    ({"model": {"lmax": 2, "mmax": 2}}, "smaller than the L=4"),
])
def test_bad_configs_fail_before_any_output(tmp_path, cache, capsys, change, match):
    cfg = {"data": {"train": [KP], "val": [KP], "r_cut": 5.0, "cache": cache}, "model": dict(TINY_MODEL),
           "train": {"epochs": 1}, "output": str(tmp_path / "out")}
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
            if k == "data":
                cfg[k]["cache"] = cache
        else:
            cfg[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.startswith("egnn train: error:")
    with pytest.raises(EgnnError, match=match):
        from egnn.train import load_config, train_from_config
        train_from_config(load_config(str(path)))
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, cache):
    """PyYAML keeps the last of two equal keys silently; a stale second `data:` (it happened in
    configs/hfo2_szv_full.yaml) would drop the first. The loader names the key and both lines."""
    from egnn.train import load_config

    good = write_config(tmp_path / "c.yaml", cache, tmp_path / "run", epochs=1)
    text = open(good).read()
    load_config(good)  # the file as written loads
    bad = tmp_path / "twice.yaml"
    bad.write_text("output: elsewhere\n" + text)
    with pytest.raises(ConfigError, match=r"key 'output' given twice \(first at line 1\)"):
        load_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text(text + "train:\n  epochs: 1\n  lr: 0.01\n  epochs: 2\n".replace("train:\n", "extra:\n"))
    with pytest.raises(ConfigError, match=r"key 'epochs' given twice \(first at line"):
        load_config(str(nested))


def test_output_stats_are_fitted_before_the_trainer_moves_the_model(tmp_path, cache, monkeypatch):
    """The Trainer moves the model to its device; the statistics are fitted from CPU samples, so
    they must be in place before (fitting after the move failed every training run on the first GPU)."""
    import egnn.train as T

    seen = []
    real_init = T.Trainer.__init__

    def init(self, model, *a, **k):
        seen.append((model.node_scale.clone(), model.node_shift.clone()))
        real_init(self, model, *a, **k)

    monkeypatch.setattr(T.Trainer, "__init__", init)
    T.train_from_config(T.load_config(write_config(tmp_path / "c.yaml", cache, tmp_path / "run", epochs=1)),
                        progress=False)
    (scale, shift), = seen
    assert not torch.equal(scale, torch.ones_like(scale)) and shift.abs().sum() > 0


def test_init_fine_tunes_from_a_checkpoints_weights(tmp_path, cache, capsys):
    """--init starts a new run (epochs from 1, new optimizer at train.lr) from the checkpoint's
    weights and statistics: with a vanishing lr its first validation loss is the checkpoint's."""
    a = write_config(tmp_path / "a.yaml", cache, tmp_path / "a", epochs=2)
    assert main(["train", a, "--json"]) == 0
    best_a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["best"]
    capsys.readouterr()
    b = write_config(tmp_path / "b.yaml", cache, tmp_path / "b", epochs=1, lr=1e-12)
    assert main(["train", b, "--json", "--init", str(tmp_path / "a" / "best.pt")]) == 0
    got = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["epoch"] for x in got] == [1] and got[0]["lr"] == pytest.approx(1e-12)
    assert got[0]["val_loss"] == pytest.approx(best_a, rel=1e-5)
    # and its weights are the checkpoint's (up to the 1e-12 step), not a fresh initialisation
    wa = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].double(), wb[k].double(), rtol=0, atol=1e-9) for k in wa)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 1e-12


def test_init_grows_a_checkpoint_by_layers(tmp_path, cache, caplog):
    """--init of a checkpoint with fewer layers into a config with more: the added layers start as
    the identity, so with a vanishing lr the first validation loss is the checkpoint's."""
    a = write_config(tmp_path / "a.yaml", cache, tmp_path / "a", epochs=1)
    assert main(["train", a, "--json"]) == 0
    best_a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["best"]
    cfg = yaml.safe_load(open(write_config(tmp_path / "b.yaml", cache, tmp_path / "b", epochs=1, lr=1e-12)))
    layers = cfg["model"].get("layers", 3)
    cfg["model"] = {**cfg["model"], "layers": layers + 1}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("INFO", logger="egnn"):
        assert main(["train", str(tmp_path / "b.yaml"), "--json", "--init", str(tmp_path / "a" / "best.pt")]) == 0
    assert f"{layers} -> {layers + 1} layers; the added ones start as the identity" in caplog.text
    got = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert got[0]["val_loss"] == pytest.approx(best_a, rel=1e-5)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model_config"]["layers"] == layers + 1


def test_init_refuses_another_model(tmp_path, cache, capsys):
    a = write_config(tmp_path / "a.yaml", cache, tmp_path / "a", epochs=1)
    assert main(["train", a, "--json"]) == 0
    cfg = yaml.safe_load(open(a))
    cfg["model"] = {**cfg["model"], "channels": 16}
    cfg["output"] = str(tmp_path / "b")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "b.yaml"), "--init", str(tmp_path / "a" / "best.pt")]) != 0
    assert "the checkpoint's model differs from the config's (channels: checkpoint 8, config 16)" in capsys.readouterr().err
    assert not (tmp_path / "b" / "best.pt").exists()


def test_resume_ignores_loss_keys_of_removed_options(tmp_path, cache, capsys):
    """A checkpoint whose best_loss names an option removed since (train.eig_fragile: 0, as written
    while it existed) still resumes with its best value: the loss is the same."""
    from egnn import checkpoint

    cfg = write_config(tmp_path / "a.yaml", cache, tmp_path / "a", epochs=1)
    assert main(["train", cfg, "--json"]) == 0
    last = str(tmp_path / "a" / "last.pt")
    ck = checkpoint.load(last)
    best = ck["best"]
    ck["best_loss"] = {**ck["best_loss"], "eig_fragile": 0.0}
    checkpoint.save(last, ck)
    capsys.readouterr()
    assert main(["train", cfg, "--json", "--epochs", "2", "--resume", last]) == 0
    out = capsys.readouterr()
    assert "the loss differs" not in out.out + out.err
    assert checkpoint.load(str(tmp_path / "a" / "last.pt"))["best"] <= best


def test_training_on_gamma_and_kpoint_runs_together_warns(caplog):
    """Γ-only and k-point runs are different targets for one geometry (docs/accuracy.md, k-point
    sampling): mixing them warns once, naming the Γ-only runs; one sampling alone does not."""
    from types import SimpleNamespace

    from egnn import errors
    from egnn.train import warn_mixed_sampling

    kp = [SimpleNamespace(name=f"kp{i}", fold=None) for i in range(3)]
    gamma = [SimpleNamespace(name=f"g{i}", fold=torch.zeros(1)) for i in range(5)]
    errors._said.clear()
    with caplog.at_level("WARNING", logger="egnn"):
        warn_mixed_sampling(kp)
        warn_mixed_sampling(gamma)
        assert not caplog.records
        warn_mixed_sampling(kp + gamma)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "5 Γ-only run(s) (g0, g1, g2, ...)" in msg and "3 k-point run(s)" in msg
