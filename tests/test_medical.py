"""Medical images: the PneumoniaMNIST loader (shipped file, hostile files refused), per-class recall and AUROC
against scikit-learn, and a short training run that reports them."""

import numpy as np
import pytest
import torch

from lamina.cli.main import main
from lamina.errors import DataError


def test_shipped_pneumoniamnist_splits():
    from lamina.data import load_dataset

    b = load_dataset("pneumoniamnist")
    assert b.train.tensors["x"].shape == (3882, 1, 28, 28) and b.input_shape == (1, 28, 28)
    assert b.meta["class_counts"] == {"train": [388, 3494], "val": [135, 389], "test": [234, 390]}
    x = b.test.tensors["x"]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("bad,expect", [
    ({"train_images": np.array([{"a": 1}], dtype=object)}, "unreadable arrays"),  # pickled objects: never loaded
    ({"train_images": np.zeros((2, 4, 4), np.float32)}, "must be uint8"),
    ({"train_labels": np.array([[0], [7]])}, "integer labels in 0..1"),
    ({"val_images": None}, "missing val_images"),
])
def test_hostile_or_malformed_files_are_one_line_errors(tmp_path, bad, expect, capsys):
    from lamina.data.medical import read_medmnist

    arrays = {f"{s}_{k}": (np.zeros((2, 4, 4), np.uint8) if k == "images" else np.array([[0], [1]]))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    arrays.update({k: v for k, v in bad.items() if v is not None})
    for k in [k for k, v in bad.items() if v is None]:
        arrays.pop(k)
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=expect):
        read_medmnist(path, 2)
    rc = main(["train", "data.name=pneumoniamnist", f"data.path={path}", f"logging.root={tmp_path}",
               "trainer.progress=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1


def test_per_class_metrics_match_scikit_learn():
    from sklearn.metrics import recall_score, roc_auc_score

    from lamina.tasks.classification import ClassificationTask

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    logits = torch.randn(200, 2, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 2)
    task = ClassificationTask(2, per_class=True, class_names=["normal", "pneumonia"])
    m = task.make_metrics()
    task.update_metrics(m, logits, {"y": y})
    got = {k: float(v) for k, v in m.compute().items()}
    p1 = logits.softmax(-1)[:, 1].numpy()
    assert got["auroc"] == pytest.approx(roc_auc_score(y.numpy(), p1), abs=1e-6)
    assert got["auroc_pneumonia"] == pytest.approx(roc_auc_score(y.numpy(), p1), abs=1e-6)
    pred = logits.argmax(-1).numpy()
    assert got["recall_normal"] == pytest.approx(recall_score(y.numpy(), pred, pos_label=0), abs=1e-6)
    assert got["recall_pneumonia"] == pytest.approx(recall_score(y.numpy(), pred, pos_label=1), abs=1e-6)
    assert "auroc" not in ClassificationTask(2).make_metrics()  # off by default


def test_short_pneumonia_run_reports_per_class_numbers(tmp_path):
    from conftest import ROOT

    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(ROOT / "configs" / "pneumonia_mnist.yaml",
                      ["model.name=small_cnn", "trainer.max_epochs=1", "data.train_fraction=0.25",
                       "trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                       f"logging.root={tmp_path}"])
    test = runs.train(cfg).summary["test"]
    assert {"test/auroc", "test/recall_normal", "test/recall_pneumonia", "test/auroc_normal"} <= set(test)
    assert 0.5 < test["test/auroc"] <= 1.0
