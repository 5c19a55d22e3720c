"""Experiment tracking: steps.csv beside metrics.csv, TensorBoard hparams and figures read back with TensorBoard's
EventAccumulator, and an MLflow run in a real local store (sqlite) read back with MLflow's client: params, metric
histories, artifacts, and the logged model's weights loaded into lamina."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lamina.cli.main import main
from lamina.config import load_config
from lamina.engine.loggers import CSVLogger
from lamina.errors import ConfigError, MissingDependencyError

mlflow = pytest.importorskip("mlflow", reason='MLflow is optional: pip install "lamina[track]"')

FAST = ["model.name=mlp", "trainer.progress=false", "cost.energy=false", "cost.flops=false", "trainer.log_every=5"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, active", [
    ([], ["tensorboard"]),
    (["logging.tensorboard=false"], []),
    (["logging.loggers=[mlflow]"], ["mlflow"]),
    (["logging.loggers=mlflow"], ["mlflow"]),
    (["logging.loggers=[mlflow]", "logging.tensorboard=true"], ["tensorboard", "mlflow"]),
    (["logging.loggers=[tensorboard,mlflow]", "logging.tensorboard=false"], ["mlflow"]),
    (["logging.loggers=[]"], []),
])
def test_loggers_and_the_tensorboard_shorthand(overrides, active):
    assert load_config(None, overrides).logging.active() == active


def test_assigning_tensorboard_false_still_turns_it_off():
    cfg = load_config(None, [])
    cfg.logging.tensorboard = False  # what trust/overfitting.py does for its inner runs
    assert cfg.logging.active() == []


def test_unknown_logger_is_one_line_naming_the_accepted():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["logging.loggers=[tensorboard,wandb]"])
    assert str(e.value) == "config error: logging.loggers: unknown logger 'wandb'; accepted: tensorboard, mlflow"


# ----- steps.csv ------------------------------------------------------------------------------------------------
def test_csv_logger_appends_steps_and_a_resume_drops_the_rows_past_its_checkpoint(tmp_path):
    lg = CSVLogger(tmp_path / "metrics.csv", steps=tmp_path / "steps.csv")
    for s in (5, 10):
        lg.log_step(s, {"train/loss_step": 1.0 / s, "lr": 0.01})
    lg.log_epoch({"epoch": 1, "step": 10, "train/loss": 0.5})
    for s in (15, 20):  # the crashed attempt logged past its last checkpoint (step 10)
        lg.log_step(s, {"train/loss_step": 9.0, "lr": 0.02})
    lg.log_epoch({"epoch": 2, "step": 20, "train/loss": 0.4})
    lg.close()
    assert [r["step"] for r in _rows(tmp_path / "steps.csv")] == ["5", "10", "15", "20"]
    assert list(_rows(tmp_path / "metrics.csv")[0]) == ["epoch", "step", "train/loss"]  # no per-step columns

    again = CSVLogger(tmp_path / "metrics.csv", steps=tmp_path / "steps.csv")
    again.load(step=10)
    assert [r["epoch"] for r in _rows(tmp_path / "metrics.csv")] == ["1"]
    again.log_step(15, {"train/loss_step": 0.25, "lr": 0.005})
    again.close()
    rows = _rows(tmp_path / "steps.csv")
    assert [(r["step"], float(r["train/loss_step"]), float(r["lr"])) for r in rows] == [
        ("5", 0.2, 0.01), ("10", 0.1, 0.01), ("15", 0.25, 0.005)]


def test_csv_logger_without_a_steps_file_drops_steps_as_before(tmp_path):
    lg = CSVLogger(tmp_path / "metrics.csv")
    lg.log_step(5, {"train/loss_step": 1.0})
    lg.close()
    assert not (tmp_path / "steps.csv").exists()


# ----- a real run with TensorBoard and MLflow ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    args = [*FAST, f"logging.root={root}", "name=r", "logging.loggers=[tensorboard,mlflow]",
            f"logging.mlflow.tracking_uri={uri}", "logging.mlflow.experiment=tests"]
    assert main(["train", "trainer.max_epochs=2", *args]) == 0
    run = root / "r"
    return {"root": root, "run": run, "uri": uri, "args": args,
            "summary": json.loads((run / "summary.json").read_text()),
            "client": mlflow.tracking.MlflowClient(tracking_uri=uri)}


def test_steps_csv_has_every_logged_step_and_metrics_csv_is_unchanged(tracked):
    s, run = tracked["summary"], tracked["run"]
    rows = _rows(run / "steps.csv")
    assert list(rows[0]) == ["step", "train/loss_step", "lr"]
    assert [int(r["step"]) for r in rows] == list(range(5, s["steps"] + 1, 5))
    assert all(float(r["lr"]) > 0 and np.isfinite(float(r["train/loss_step"])) for r in rows)
    metrics = _rows(run / "metrics.csv")
    assert len(metrics) == 2 and "train/loss_step" not in metrics[0]  # its columns as before (lr: LRMonitor)


def test_tensorboard_has_the_config_as_hparams_the_end_metrics_and_the_figures(tracked):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    s, run = tracked["summary"], tracked["run"]
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = start.hparams
    assert hp["trainer.max_epochs"].number_value == 2
    assert hp["trainer.log_every"].number_value == 5
    assert hp["data.name"].string_value == "digits" and hp["model.name"].string_value == "mlp"
    assert hp["logging.loggers"].string_value == '["tensorboard", "mlflow"]'
    assert hp["optimizer.lr"].number_value == pytest.approx(1e-2)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} >= {"test/acc", f"best/{s['monitor']}", "final/val/acc"}
    # the end metrics as scalars at the run's last step, equal to summary.json's (float32 in the event file)
    (test_acc,) = ea.Scalars("test/acc")
    assert test_acc.step == s["steps"] and test_acc.value == pytest.approx(s["test"]["test/acc"], abs=1e-6)
    (best,) = ea.Scalars(f"best/{s['monitor']}")
    assert best.value == pytest.approx(s["best_monitor"], abs=1e-6)
    # per-step scalars, as in steps.csv
    assert [e.step for e in ea.Scalars("train/loss_step")] == [int(r["step"]) for r in _rows(run / "steps.csv")]
    # the figures: the PNGs of the run folder, pixel for pixel
    tags = ea.Tags()["images"]
    assert {"figures/curves", "figures/confusion"} <= set(tags)
    for name in ("curves", "confusion"):
        (img,) = ea.Images(f"figures/{name}")
        import io

        got = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
        want = np.asarray(Image.open(run / f"{name}.png").convert("RGB"))
        assert got.shape == want.shape and np.array_equal(got, want)


def test_mlflow_run_has_params_metrics_tags_artifacts_and_a_loadable_model(tracked, tmp_path):
    from lamina.runs import open_run

    s, run, client = tracked["summary"], tracked["run"], tracked["client"]
    info = s["tracking"]["mlflow"]
    assert info["tracking_uri"] == tracked["uri"]
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == info["run_id"]
    r = client.get_run(info["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "r"
    assert client.get_experiment(r.info.experiment_id).name == "tests"
    p = r.data.params
    assert p["trainer.max_epochs"] == "2" and p["data.name"] == "digits" and p["optimizer.name"] == "adamw"
    import lamina

    t = r.data.tags
    assert (t["lamina.version"], t["lamina.data"], t["lamina.model"], t["lamina.task"]) == (
        lamina.__version__, "digits", "mlp", "classification")
    # per-step history = steps.csv (values exactly: both are float64 of the same numbers)
    steps = _rows(run / "steps.csv")
    hist = sorted(client.get_metric_history(r.info.run_id, "train/loss_step"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(int(x["step"]), float(x["train/loss_step"])) for x in steps]
    assert len(client.get_metric_history(r.info.run_id, "lr")) == len(steps)
    # per-epoch history = metrics.csv, at each epoch's step
    epochs = _rows(run / "metrics.csv")
    val = sorted(client.get_metric_history(r.info.run_id, "val/acc"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in val] == [(int(e["step"]), float(e["val/acc"])) for e in epochs]
    assert r.data.metrics["test/acc"] == pytest.approx(s["test"]["test/acc"])
    # artifacts: the run's files and the model folder
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.csv", "steps.csv", "curves.png", "confusion.png", "model"} <= top
    model = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert model == {"model/model.safetensors", "model/meta.json", "model/config.yaml", "model/data.json"}
    # the logged model loads back into lamina (safetensors + JSON) with the run's best weights, tensor for tensor
    local = Path(client.download_artifacts(r.info.run_id, "model", str(tmp_path)))
    got, want = open_run(local).model.state_dict(), open_run(run).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resumed_run_continues_the_same_mlflow_run_without_repeating_a_step(tracked):
    client = tracked["client"]
    args = [*(a if a != "name=r" else "name=resumed" for a in tracked["args"]), "logging.plots=false"]  # same store
    assert main(["train", "trainer.max_epochs=2", *args]) == 0
    run = tracked["root"] / "resumed"
    first = json.loads((run / "summary.json").read_text())
    run_id, done = first["tracking"]["mlflow"]["run_id"], first["steps"]
    with open(run / "steps.csv", "a") as f:  # what a crashed attempt logged after its last checkpoint
        f.write(f"{done + 5},99.0,0.5\n{done + 10},99.0,0.5\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tb")) as w:  # ... and in TensorBoard
        for st in (done + 5, done + 10):
            w.add_scalar("train/loss_step", 99.0, st)
    # TensorBoard reads event files in name order: the name starts with the second the writer opened, then a
    # process-wide counter compared as text ("10" < "9"), so a resume within the same second as the crashed
    # attempt could be read first. A real resume is seconds later; here wait for the next second.
    time.sleep(1.01 - time.time() % 1)
    assert main(["train", "--resume", str(run), "trainer.max_epochs=3", *args]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["tracking"]["mlflow"]["run_id"] == run_id
    steps = [int(r["step"]) for r in _rows(run / "steps.csv")]
    assert steps == list(range(5, s["steps"] + 1, 5)) and "99.0" not in (run / "steps.csv").read_text()
    hist = client.get_metric_history(run_id, "train/loss_step")
    assert sorted(m.step for m in hist) == steps  # each step once
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [int(r["step"])
                                                                                for r in _rows(run / "metrics.csv")]
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["lamina.resumed"] == "true"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()  # the resumed writer's purge_step hides the crashed attempt's points past the checkpoint
    tb = ea.Scalars("train/loss_step")
    assert [e.step for e in tb] == steps and 99.0 not in [e.value for e in tb]
    assert r.data.params["trainer.max_epochs"] == "2"  # params stay as first logged (MLflow refuses changes)


# ----- bad stores and the missing extra --------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/a-file/sub/mlflow.db", "nosuchscheme://host/x"])
def test_a_store_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path, capsys, uri):
    (tmp_path / "a-file").write_text("not a folder")
    uri = uri.format(tmp=tmp_path)
    rc = main(["train", *FAST, f"logging.root={tmp_path / 'runs'}", "logging.loggers=[mlflow]",
               f"logging.mlflow.tracking_uri={uri}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"config error: logging.mlflow.tracking_uri: cannot open MLflow store '{uri}'")
    assert "accepted: sqlite:///" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing trained or written


def test_unknown_logger_through_the_cli_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["train", *FAST, f"logging.root={tmp_path}", "logging.loggers=[tensorboard,wandb]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["config error: logging.loggers: unknown logger 'wandb'; accepted: tensorboard, mlflow"]


def test_missing_mlflow_names_the_extra(monkeypatch, tmp_path):
    import sys

    from lamina.runs.tracking import open_store

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = load_config(None, [f"logging.root={tmp_path}", "logging.loggers=[mlflow]"])
    with pytest.raises(MissingDependencyError, match=r'pip install "lamina\[track\]"'):
        open_store(cfg)


def test_missing_mlflow_through_the_cli_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    rc = main(["train", *FAST, f"logging.root={tmp_path}", "logging.loggers=[mlflow]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ['missing dependency: logging.loggers: mlflow needs the mlflow package: '
                               'pip install "lamina[track]"']
    assert not any(tmp_path.iterdir())  # refused before the run folder
