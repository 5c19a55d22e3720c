"""What a run cost (runs/cost.py): FLOPs against hand counts, a count that leaves the model and the data order as
they were, energy marked measured/estimated in a real run's summary.json, the config's country, a run without
CodeCarbon, and sums over runs that never hide a mixture of measured and estimated figures."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lamina.config.schema import CostConfig
from lamina.runs.cost import CostMeter, _component_sources, describe, flops_per_sample, total_cost

HAS_RAPL = Path("/sys/class/powercap/intel-rapl").exists()


class _Classify:
    """The two task verbs the count uses: forward and loss."""

    def forward(self, model, batch):
        return model(batch["x"])

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["y"])


def _batch(n=5, d=4, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g), "y": torch.randint(0, k, (n,), generator=g)}


def test_mlp_flops_are_the_hand_count():
    # Linear(in, out) on one sample: in * out multiply-adds = 2 * in * out FLOPs (the bias add is not counted).
    torch.manual_seed(0)
    dims = [(4, 64), (64, 64), (64, 10)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    fwd = sum(2 * i * o for i, o in dims)  # 9984
    assert flops_per_sample(model, _Classify(), _batch(), train=False) == fwd
    # forward + backward: every layer's weight gradient (2 * in * out) and every input gradient but the first
    # layer's (the data needs none): exactly 3x forward minus 2 * 4 * 64 here
    train = flops_per_sample(model, _Classify(), _batch(), train=True)
    assert train == 3 * fwd - 2 * 4 * 64
    assert train / fwd == pytest.approx(3.0, abs=0.06)  # ~3x: the tolerance is the first layer's input gradient


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(32, 10))


def test_count_leaves_weights_grads_batchnorm_rng_and_loader_as_found():
    from lamina.data import InMemoryLoader
    from lamina.data.base import TensorData

    model = _bn_net()
    model.eval()  # a mode the count must restore (it runs the training pass in train mode)
    # a real training pass would move BatchNorm's statistics: the comparison below can fail
    probe = _bn_net()
    probe.train()
    probe(_batch(8)["x"])
    assert not torch.equal(probe[1].running_mean, model[1].running_mean)

    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights, running mean/var, num_batches_tracked
    b = _batch(64)
    loader = InMemoryLoader(TensorData(x=b["x"], y=b["y"]), 16, shuffle=True, seed=3)
    loader_state, rng = loader.state_dict()["generator"].clone(), torch.get_rng_state()
    meter = CostMeter(CostConfig(energy=False))
    flops = meter.count_flops(model, _Classify(), loader, loader)
    assert flops["forward_per_sample"] == 2 * (4 * 32 + 32 * 10)
    assert flops["train_per_sample"] > flops["forward_per_sample"] and flops["train_batch"] == 16
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew from a forked RNG
    assert torch.equal(loader.state_dict()["generator"], loader_state)  # the first epoch's order is unchanged


def test_real_run_summary_has_its_cost(digits_run):
    s = json.loads((digits_run / "summary.json").read_text())
    c = s["cost"]
    assert c["energy_kwh"] > 0 and c["co2e_kg"] > 0 and c["country"] == "USA"
    assert c["energy_kwh"] == pytest.approx(sum(p["kwh"] for p in c["components"].values()), rel=1e-6)
    assert c["components"]["ram"]["source"] == "estimated"  # always a model
    assert c["source"] in ("measured", "estimated", "mixed") and c["explanation"]
    if not HAS_RAPL and not torch.cuda.is_available():  # this machine: no power counter, so a model throughout
        assert c["source"] == "estimated" and "no RAPL" in c["explanation"]
    f = c["flops"]
    assert f["forward_per_sample"] > 0 and f["train_per_sample"] > 2 * f["forward_per_sample"]
    assert f["training"] == f["train_per_sample"] * f["samples_seen"]
    assert f["samples_seen"] == pytest.approx(s["train_samples_per_s"] * s["train_time_s"], rel=1e-6)
    assert c["wall_time_s"] == s["wall_time_s"] and 0 < c["tracked_s"] < c["wall_time_s"]
    assert "kWh (" in describe(c) and "FLOP/sample forward" in describe(c)


def test_tracker_writes_nothing_into_the_cwd_and_prints_nothing(tmp_path, monkeypatch, capfd):
    pytest.importorskip("codecarbon")
    import logging

    logging.getLogger("codecarbon").setLevel(logging.INFO)  # as a fresh process has it (CodeCarbon's default)
    monkeypatch.chdir(tmp_path)
    meter = CostMeter(CostConfig())
    with meter.tracking():
        torch.randn(256, 256) @ torch.randn(256, 256)
    c = meter.result(samples_seen=0, wall_time_s=1.0)
    assert c["energy_kwh"] > 0 and c["source"] in ("measured", "estimated", "mixed")
    assert os.listdir(tmp_path) == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # CodeCarbon's INFO/WARNING lines are silenced


def test_bad_country_is_one_config_line_exit_2(capsys):
    from lamina.cli.main import main

    assert main(["train", "cost.country=XYZ"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cost.country" in err[0] and "USA" in err[0] and "'XYZ'" in err[0], err


def test_without_codecarbon_the_run_trains_and_says_why(tmp_path, monkeypatch, capsys):
    from lamina.cli.main import main

    monkeypatch.setitem(__import__("sys").modules, "codecarbon", None)  # `import codecarbon` now fails
    rc = main(["train", "--no-progress", "trainer.max_epochs=1", "trainer.max_steps=3", "trainer.threads=1",
               "logging.tensorboard=false", "logging.plots=false", f"logging.root={tmp_path}"])
    out, err = capsys.readouterr()
    assert rc == 0
    c = json.loads((Path(out.strip()) / "summary.json").read_text())["cost"]
    assert c["energy_kwh"] is None and c["source"] == "not measured"
    assert 'pip install "lamina[cost]"' in c["explanation"]
    assert c["flops"]["training"] > 0  # FLOPs need no CodeCarbon
    lines = err.splitlines()  # the CLI: its cost line, and exactly one warning naming the extra
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and 'pip install "lamina[cost]"' in warnings[0], lines
    assert any(ln.startswith("cost: energy not measured, ") and "FLOP training" in ln for ln in lines), lines


def _cost(kwh, source, cpu_source=None):
    return {"cost": {"energy_kwh": kwh, "co2e_kg": kwh * 0.4, "country": "USA", "source": source,
                     "wall_time_s": 10.0, "flops": {"training": 1e12},
                     "components": {"cpu": {"kwh": kwh / 2, "source": cpu_source or source},
                                    "ram": {"kwh": kwh / 2, "source": "estimated"}}}}


def test_total_cost_never_adds_measured_and_estimated_silently():
    same = total_cost([_cost(1e-3, "estimated"), _cost(2e-3, "estimated")])
    assert same["source"] == "estimated" and same["energy_kwh"] == pytest.approx(3e-3) and same["complete"]
    assert same["training_flops"] == 2e12 and same["wall_time_s"] == 20.0 and same["runs"] == 2

    mixed = total_cost([_cost(1e-3, "mixed", cpu_source="measured"), _cost(2e-3, "estimated")])
    assert mixed["source"] == "mixed"
    assert mixed["by_source"] == {"mixed": pytest.approx(1e-3), "estimated": pytest.approx(2e-3)}
    assert mixed["components"]["cpu"]["source"] == "mixed" and mixed["components"]["ram"]["source"] == "estimated"
    assert "1 run mixed" in mixed["explanation"] and "1 run estimated" in mixed["explanation"]

    gap = total_cost([_cost(1e-3, "measured"), {"cost": {"energy_kwh": None, "source": "not measured"}}])
    assert gap["source"] == "measured" and not gap["complete"] and gap["runs_without_energy"] == 1
    assert "lower bound" in gap["explanation"]
    assert total_cost([])["source"] == "not measured"


def test_each_component_is_marked_by_how_codecarbon_got_it():
    class CPU:  # CodeCarbon's hardware objects, by class name and mode
        def __init__(self, mode):
            self._mode, self._tdp = mode, 65

    class GPU:
        pass

    class RAM:
        pass

    class Data:
        cpu_energy, gpu_energy, ram_energy, cpu_power, gpu_power, ram_power = 1e-4, 2e-4, 1e-5, 30.0, 200.0, 10.0

    class Tracker:
        def __init__(self, *hw):
            self._hardware = list(hw)

    rapl = _component_sources(Tracker(RAM(), CPU("intel_rapl"), GPU()), Data, "process")
    assert [rapl[k]["source"] for k in ("cpu", "gpu", "ram")] == ["measured", "measured", "estimated"]
    load = _component_sources(Tracker(RAM(), CPU("cpu_load")), Data, "process")
    assert load["cpu"]["source"] == "estimated" and "65 W TDP" in load["cpu"]["method"] and "gpu" not in load
    assert list(load) == ["cpu", "ram"]


def test_report_shows_cost_escaped(tmp_path):
    from lamina.report.html import build_report

    (tmp_path / "config.yaml").write_text("name: x\n")
    cost = _cost(3.1e-4, "estimated")["cost"] | {"explanation": "<script>alert(1)</script>",
                                                  "flops": {"forward_per_sample": 1.23e6, "training": 4.5e12}}
    (tmp_path / "summary.json").write_text(json.dumps({"cost": cost}))
    page = build_report(tmp_path).read_text()
    assert '<section id="cost">' in page and "1.23 MFLOP" in page and "4.5 TFLOP" in page and "0.00031 kWh" in page
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_cli_line_format():
    c = _cost(3.1e-4, "estimated")["cost"] | {"explanation": "CPU: 8 W TDP x load (no RAPL); RAM: 10 W model",
                                              "co2e_kg": 1.2e-4,
                                              "flops": {"forward_per_sample": 1.23e6, "training": 4.5e12}}
    assert describe(c) == ("0.00031 kWh (estimated: CPU: 8 W TDP x load (no RAPL); RAM: 10 W model), 0.12 g CO2e "
                           "(USA), 1.23 MFLOP/sample forward, 4.5 TFLOP training")


def test_report_survives_cost_of_the_wrong_types(tmp_path):
    from lamina.report.html import build_report

    (tmp_path / "config.yaml").write_text("name: x\n")
    cost = {"energy_kwh": "<i>e</i>", "co2e_kg": [1], "wall_time_s": {"a": 1}, "source": "<s>", "country": "<c>",
            "components": {"<x>": {"kwh": "<y>", "source": 3}, "ram": [1]}, "flops": {"forward_per_sample": "<z>"}}
    (tmp_path / "summary.json").write_text(json.dumps({"cost": cost}))
    page = build_report(tmp_path).read_text()
    assert '<section id="cost">' in page
    assert not any(tag in page for tag in ("<i>", "<s>", "<c>", "<x>", "<y>", "<z>"))
