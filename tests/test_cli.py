"""CLI verbs on real data: train -> eval -> predict, --print-config, models, data, --version."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lamina.cli.main import main

FAST = ["trainer.progress=false", "logging.tensorboard=false"]


def test_version():
    p = subprocess.run([sys.executable, "-m", "lamina", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().startswith("lamina 0.")


def test_every_verb_help_renders(capsys):
    """argparse formats help strings with %: one stray '%' in any verb's help broke `lamina --help` for all."""
    from lamina.cli.main import _parser

    p = _parser()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    assert e.value.code == 0
    verbs = next(a for a in p._actions if isinstance(getattr(a, "choices", None), dict)).choices
    for name, sp in verbs.items():
        assert sp.format_help(), name
    assert "fewshot" in capsys.readouterr().out


def test_print_config_is_resolved_yaml(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  max_epochs: 4\nmodel:\n  name: mlp\n  depth: 3\n")
    assert main(["train", str(cfg), "trainer.max_epochs=2", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["trainer"]["max_epochs"] == 2 and out["model"] == {"name": "mlp", "pretrained": None, "adapter": None,
                                                                 "depth": 3}
    assert out["optimizer"]["name"] == "adamw"  # defaults are filled in
    assert not (tmp_path / "runs").exists()


def test_models_and_data_tables(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().err
    for name in ("mlp", "lenet5", "small_cnn", "resnet18", "resnet56"):
        assert name in out
    assert "11,181,642" in out  # resnet18, 3 channels, 10 classes
    assert main(["data"]) == 0
    out = capsys.readouterr().err
    for name in ("digits", "iris", "fashion_mnist", "table", "image_folder", "idx", "text"):
        assert name in out


def test_train_eval_predict_round_trip(tmp_path, capsys):
    from sklearn.datasets import load_digits

    assert main(["train", "model.name=mlp", "trainer.max_epochs=3", f"logging.root={tmp_path}", "name=r", *FAST]) == 0
    run = Path(capsys.readouterr().out.strip())
    assert run == tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test/acc"] == pytest.approx(summary["test"]["test/acc"], abs=1e-6) and ev["n"] == 359
    d = load_digits()
    np.save(tmp_path / "x.npy", (d.images[:20] / 16).reshape(20, 1, 8, 8).astype(np.float32))
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 20 and all(0 <= r["confidence"] <= 1 for r in rows)
    hits = sum(r["label"] == t for r, t in zip(rows, d.target[:20]))
    assert hits >= 16  # an MLP after 3 epochs is right on most training digits


def test_resume_via_cli_extends_run(tmp_path, capsys):
    args = ["model.name=mlp", f"logging.root={tmp_path}", "name=r", *FAST, "logging.plots=false"]
    assert main(["train", "trainer.max_epochs=2", *args]) == 0
    capsys.readouterr()
    run = tmp_path / "r"
    assert main(["train", "--resume", str(run), "trainer.max_epochs=3", *args]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_regression_table_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = 2 * x[:, 0] - x[:, 1] + 0.1 * rng.normal(size=300)
    kind = np.where(x[:, 2] > 0, "hi", "lo")
    lines = ["a,b,c,kind,y"] + [f"{a:.5f},{b:.5f},{c:.5f},{k},{t:.5f}" for (a, b, c), k, t in zip(x, kind, y)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "data.name=table", f"data.path={tmp_path / 't.csv'}", "data.target=y", "model.name=mlp",
                 "trainer.max_epochs=30", "optimizer.lr=3e-3", f"logging.root={tmp_path}", "name=reg", *FAST]) == 0
    s = json.loads((tmp_path / "reg" / "summary.json").read_text())
    assert s["task"] == "regression" and s["test"]["test/r2"] > 0.9
    (tmp_path / "new.csv").write_text("a,b,c,kind\n1.0,0.0,0.5,hi\n")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "reg"), str(tmp_path / "new.csv")]) == 0
    value = float(capsys.readouterr().out.split()[-1])
    assert value == pytest.approx(2.0, abs=0.4)


def test_default_job_reaches_target(tmp_path, capsys, monkeypatch):
    """`lamina train` with no arguments: digits CNN, >= 98.5% held-out test accuracy."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress"]) == 0
    run = Path(capsys.readouterr().out.strip())
    s = json.loads((tmp_path / run / "summary.json").read_text())
    assert s["data"]["name"] == "digits" and s["model"] == "small_cnn"
    assert s["test"]["test/acc"] >= 0.985
    assert (tmp_path / run / "confusion.png").stat().st_size > 10_000


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow  # ~107 s; the default-job CLI test covers the same path in CI
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_config_on_a_subset(tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"
    assert main(["train", str(cfg), "data.limit=4000", "trainer.max_epochs=2", f"logging.root={tmp_path}",
                 *FAST]) == 0
    s = json.loads((tmp_path / "fashion-mnist-cnn" / "summary.json").read_text())
    assert s["data"]["test"] == 10000 and s["test"]["test/acc"] >= 0.70  # 4k images, 2 epochs


@pytest.mark.slow
def test_compile_trains(tmp_path):
    from lamina import runs
    from lamina.config import load_config

    res = runs.train(load_config(None, ["model.name=mlp", "trainer.compile=true", "trainer.max_epochs=2",
                                          f"logging.root={tmp_path}", *FAST, "logging.plots=false"]))
    assert res.summary["test"]["test/acc"] > 0.85
