"""Tools on streamed splits: explain, attacks, static-int8 calibration (compress and ONNX export), gradient health,
face identification, triplet (P x K identity) batches and few-shot episodes read only what they need from files
(the first n samples, samples by index, or the split batch by batch) and give the in-memory results; continual
learning refuses with the memory it would need. (Data streaming itself: tests/test_out_of_core.py.)"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lamina import runs
from lamina.cli.main import main
from lamina.config import load_config
from lamina.data import load_dataset
from lamina.data.outofcore import ImageFiles
from lamina.data.sample import first_samples, split_batches, take
from lamina.data.tablestream import TableStream
from lamina.errors import DataError

from test_out_of_core import _image_folder, _parquet

FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "data.batch_size=8",
        "data.name=image_folder", "trainer.max_epochs=1", "data.num_workers=0", "cost.energy=false",
        "cost.flops=false", "data.eval_batch_size=16"]


def test_first_samples_take_and_batches_equal_in_memory(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    mem = load_dataset("image_folder", path=root, in_memory=True, seed=1)
    disk = load_dataset("image_folder", path=root, in_memory=False, seed=1, num_workers=0)
    assert isinstance(disk.test, ImageFiles)
    a, b = first_samples(mem.train, 5), first_samples(disk.train, 5)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and len(b["x"]) == 5
    assert len(first_samples(disk.test, 100)["x"]) == len(disk.test)  # capped at the split's size
    idx = torch.tensor([4, 0, 4, 2])
    assert torch.equal(take(mem.train, idx)["x"], take(disk.train, idx)["x"])
    whole = torch.cat([b["x"] for b in split_batches(disk.train, 4)])
    assert torch.equal(whole, mem.train.x)
    # tables: rows read in file order until n are in hand; take() puts them back in the asked order
    p = _parquet(tmp_path / "t.parquet")
    tm = load_dataset("table", path=p, target="label", in_memory=True)
    td = load_dataset("table", path=p, target="label", in_memory=False)
    assert isinstance(td.train, TableStream)
    torch.testing.assert_close(first_samples(td.train, 30)["x"], tm.train.x[:30], rtol=1e-6, atol=1e-6)
    idx = torch.tensor([50, 3, 3, 17])
    got = take(td.train, idx)
    torch.testing.assert_close(got["x"], tm.train.x[idx], rtol=1e-6, atol=1e-6)
    assert torch.equal(got["y"], tm.train.y[idx])


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """One trained small CNN, opened twice: as trained (in memory) and with data.in_memory=false (streamed).
    Same weights, so every tool must give the same numbers on both."""
    tmp = tmp_path_factory.mktemp("twins")
    root = _image_folder(tmp / "imgs", (12, 12, 12), hw=(8, 8))
    res = runs.train(load_config(None, [*FAST, f"logging.root={tmp}", "name=mem", f"data.path={root}",
                                        "model.name=small_cnn", "data.in_memory=true"]))
    mem = Path(res.run_dir)
    disk = tmp / "disk"
    shutil.copytree(mem, disk)
    for meta in (disk / "checkpoints").glob("*/meta.json"):  # where open_run reads the run's config
        m = json.loads(meta.read_text())
        assert m["config"]["data"]["in_memory"] is True
        m["config"]["data"]["in_memory"] = False
        meta.write_text(json.dumps(m))
    opened = runs.open_run(disk)
    assert isinstance(opened.data().test, ImageFiles)
    return mem, disk


def test_explain_streamed_equals_in_memory(twin_runs, tmp_path):
    from lamina.trust.explain import explain_run

    mem, disk = twin_runs
    for method in ("integrated_gradients",):
        a = explain_run(mem, method, n=5, out=tmp_path / "a")
        b = explain_run(disk, method, n=5, out=tmp_path / "b")
        assert [e["pred"] for e in a["examples"]] == [e["pred"] for e in b["examples"]]
        za, zb = np.load(a["npz"]), np.load(b["npz"])
        np.testing.assert_array_equal(za["x"], zb["x"])
        np.testing.assert_allclose(za["attributions"], zb["attributions"], rtol=1e-5, atol=1e-7)
        assert np.abs(za["attributions"]).sum() > 0


def test_attack_streamed_equals_in_memory(twin_runs):
    from lamina.trust.robust import attack_run

    mem, disk = twin_runs
    for kw in ({"attack": "fgsm", "eps": 0.05}, {"attack": "pgd", "eps": 0.03, "steps": 3, "n": 5}):
        a, b = attack_run(mem, **kw), attack_run(disk, **kw)
        assert (a["n"], a["clean_acc"], a["robust_acc"]) == (b["n"], b["clean_acc"], b["robust_acc"])
    assert a["n"] == 5 and attack_run(disk, attack="fgsm", eps=0.05)["n"] == 7  # 36 images, 20% test
    # the value-range check still holds on a streamed split, batch by batch (CLI case: the table test below)
    with pytest.raises(DataError, match=r"outside the attack's value range \[0.2, 0.4\]"):
        attack_run(disk, attack="fgsm", eps=0.01, clamp=(0.2, 0.4))


def test_static_int8_calibration_streamed_equals_in_memory(twin_runs):
    from lamina.compress import quantize as q
    from lamina.compress.run import calibration_batches, example_batch, open_context

    mem, disk = twin_runs
    cm, cd = open_context(mem), open_context(disk)
    ba, bb = calibration_batches(cm, 20, batch=8), calibration_batches(cd, 20, batch=8)
    assert [len(b) for b in ba] == [len(b) for b in bb] == [8, 8, 4]
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    x = example_batch(cm, 6)
    assert torch.equal(x, example_batch(cd, 6))
    with torch.no_grad():
        qa, qb = q.static_int8(cm.model, ba), q.static_int8(cd.model, bb)
        assert torch.equal(qa(x), qb(x))


@pytest.mark.slow
def test_onnx_int8_export_streamed_equals_in_memory(twin_runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from lamina.deploy.export import export_run

    mem, disk = twin_runs
    a = export_run(mem, "onnx", int8=True, out=tmp_path / "a", batch=8)
    b = export_run(disk, "onnx", int8=True, out=tmp_path / "b", batch=8)
    qa, qb = a["artifacts"][1], b["artifacts"][1]
    assert qa["file"].endswith(".int8.onnx") and qa["accuracy"] == qb["accuracy"]
    assert qa["max_abs_diff"] == pytest.approx(qb["max_abs_diff"], abs=1e-6)  # same calibration -> same int8 model


def test_gradient_health_streamed_equals_in_memory(twin_runs):
    from lamina.trust.gradients import gradient_health_run

    mem, disk = twin_runs
    a, b = gradient_health_run(mem, batch_size=6), gradient_health_run(disk, batch_size=6)
    assert a["summary"].keys() == b["summary"].keys()
    for k in a["summary"]:
        assert a["summary"][k] == pytest.approx(b["summary"][k], rel=1e-5, abs=1e-9), k


def test_face_identification_streamed_equals_in_memory(tmp_path):
    from lamina.runs.faces import run_threshold

    root = _image_folder(tmp_path / "imgs", (8, 8, 8, 8), hw=(8, 8), mode="L")
    args = [*FAST, f"logging.root={tmp_path}", f"data.path={root}", "model.name=face_cnn", "task.name=face",
            "trainer.deterministic=true", "data.val_fraction=0.25", "task.label_smoothing=0"]
    a = runs.train(load_config(None, [*args, "name=mem", "data.in_memory=true"]))
    b = runs.train(load_config(None, [*args, "name=disk", "data.in_memory=false"]))
    assert b.summary["data_path"].startswith("streaming from files")
    for k in ("test/gallery_top1", "test/nn_top1"):
        assert a.summary["test"][k] == pytest.approx(b.summary["test"][k], abs=1e-6), k
    ta, tb = (run_threshold(runs.open_run(r.run_dir), far=0.05) for r in (a, b))  # 24 impostor pairs
    assert ta is not None and ta == pytest.approx(tb, abs=1e-5)


def test_fewshot_episodes_from_streamed_files(tmp_path):
    from lamina.data.episodes import EpisodeSampler

    root = _image_folder(tmp_path / "imgs", (6, 6, 6), hw=(4, 4))
    mem = load_dataset("image_folder", path=root, in_memory=True, val_fraction=0.0, test_fraction=0.0)
    disk = load_dataset("image_folder", path=root, in_memory=False, val_fraction=0.0, test_fraction=0.0)
    a = list(EpisodeSampler(mem.train, 2, 2, 1, episodes=3, seed=4))
    b = list(EpisodeSampler(disk.train, 2, 2, 1, episodes=3, seed=4))
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_triplet_identity_batches_streamed_equal_in_memory(tmp_path):
    """P x K identity batches draw indices at random: a streamed split decodes each batch's files as drawn."""
    from lamina.engine.checkpoint import load_checkpoint

    root = _image_folder(tmp_path / "imgs", (6, 6, 6, 6), hw=(8, 8), mode="L")
    args = [*FAST, f"logging.root={tmp_path}", f"data.path={root}", "model.name=face_cnn", "task.name=face",
            "task.loss=triplet", "task.label_smoothing=0", "task.identities_per_batch=2",
            "task.images_per_identity=2", "trainer.deterministic=true", "trainer.max_epochs=2",
            "data.augment=[{name: hflip}]"]
    a = runs.train(load_config(None, [*args, "name=mem", "data.in_memory=true"]))
    b = runs.train(load_config(None, [*args, "name=disk", "data.in_memory=false"]))
    assert b.summary["data_path"].startswith("streaming from files") and b.summary["steps"] == a.summary["steps"] > 4
    wa, _, _ = load_checkpoint(Path(a.run_dir) / "checkpoints" / "last", with_state=False)
    wb, _, _ = load_checkpoint(Path(b.run_dir) / "checkpoints" / "last", with_state=False)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_cli_refuses_continual_on_streamed_data(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs", (6, 6), hw=(4, 4), mode="L")
    args = [*FAST, f"logging.root={tmp_path}", f"data.path={root}", "model.name=mlp", "data.in_memory=false",
            "continual.experiences=2"]
    assert main(["continual", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("continual learning needs the whole split in memory as tensors (9 samples, 0.6 kB as "
                        "float32) but it is streamed from files; pass data.in_memory=true (with enough memory) or a "
                        "smaller data set") and "\n" not in err
    with pytest.raises(DataError, match="expected at least one sample"):
        first_samples(load_dataset("image_folder", path=root, in_memory=False).train, 0)
    with pytest.raises(DataError, match="expected at least one sample"):
        first_samples(load_dataset("image_folder", path=root, in_memory=False).train, 0)
