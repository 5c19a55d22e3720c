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


# ----- DICOM, NIfTI, volumes (real sample files that ship with pydicom and nibabel) ---------------------------------
pydicom = pytest.importorskip("pydicom", reason="pip install lamina[medical]")
nibabel = pytest.importorskip("nibabel", reason="pip install lamina[medical]")


def _nib_data(name):
    from pathlib import Path

    return Path(nibabel.__file__).parent / "tests" / "data" / name


def test_read_dicom_applies_rescale_and_keeps_metadata():
    from pydicom.data import get_testdata_file

    from lamina.data.medical import read_dicom, window

    path = get_testdata_file("CT_small.dcm")
    hu, meta = read_dicom(path)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    np.testing.assert_allclose(hu, raw * 1.0 - 1024.0)  # RescaleSlope 1, RescaleIntercept -1024: Hounsfield units
    assert meta["modality"] == "CT" and meta["pixel_spacing"] == pytest.approx([0.661468, 0.661468])
    assert meta["slice_thickness"] == 5.0 and meta["rescale"] == [1.0, -1024.0]
    w = window(np.array([-1350.0, -600.0, -600.0 + 750.0, 2000.0]), -600.0, 1500.0)  # the lung preset
    np.testing.assert_allclose(w, [0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_dicom_without_pixels_or_oversized_is_refused(tmp_path, monkeypatch):
    from pydicom.data import get_testdata_file

    from lamina.data import medical

    with pytest.raises(DataError, match="without pixel data"):
        medical.read_dicom(get_testdata_file("rtplan.dcm"))
    with pytest.raises(DataError, match="not a readable DICOM"):
        medical.read_dicom(_npz(tmp_path / "x.npz", a=np.zeros(3)))
    monkeypatch.setattr(medical, "MAX_VOXELS", 100)  # a 128 x 128 CT declares more: refused before decoding
    with pytest.raises(DataError, match="refused before decoding"):
        medical.read_dicom(get_testdata_file("CT_small.dcm"))


def test_dicom_series_sorted_by_position(tmp_path):
    from pydicom.data import get_testdata_file

    from lamina.data.medical import read_dicom_series

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, z in enumerate([10.0, -5.0, 2.5]):  # written out of order; spacing must come from positions
        ds = src.copy()
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = k + 1
        arr = ds.pixel_array.copy()
        arr[:] = k  # slice k is filled with k
        ds.PixelData = arr.tobytes()
        ds.save_as(tmp_path / f"s{k}.dcm")
    vol, meta = read_dicom_series(tmp_path)
    assert vol.shape == (3, 128, 128)
    assert [float(vol[i, 0, 0]) + 1024 for i in range(3)] == [1.0, 2.0, 0.0]  # z = -5, 2.5, 10
    assert meta["spacing"][0] == pytest.approx(7.5) and meta["slices"] == 3


def test_read_nifti_reorients_to_ras_and_keeps_spacing():
    from lamina.data.medical import read_nifti

    path = _nib_data("anatomical.nii")
    vol, meta = read_nifti(path)
    img = nibabel.load(str(path))
    assert meta["axcodes"] == "LAS" and meta["canonical"] == "RAS" and meta["spacing"] == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(vol, np.asarray(img.get_fdata(dtype=np.float32))[::-1])  # L->R: axis 0 flipped
    with pytest.raises(DataError, match="4-D image"):
        read_nifti(_nib_data("example4d.nii.gz"))


def test_volume_folder_trains_a_3d_cnn(tmp_path):
    """The 3-D path end to end: NIfTI files in class folders -> medical_volumes -> cnn3d_small -> Trainer. The
    volumes are nibabel's real sample scans; the two classes differ by a synthetic bright blob, so the run can
    learn (this checks the plumbing; no labelled 3-D set is available offline)."""
    from lamina import runs
    from lamina.config import load_config

    base = nibabel.load(str(_nib_data("anatomical.nii")))
    data = np.asarray(base.get_fdata(dtype=np.float32))
    rng = np.random.default_rng(0)
    for cls in ("blob", "plain"):
        (tmp_path / "vols" / cls).mkdir(parents=True)
        for i in range(12):
            v = data + rng.normal(0, data.std() * 0.1, data.shape).astype(np.float32)
            if cls == "blob":
                c = rng.integers(8, 18, 3)
                v[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] += 4 * data.std()
            nibabel.save(nibabel.Nifti1Image(v, base.affine), str(tmp_path / "vols" / cls / f"{i}.nii.gz"))
    cfg = load_config(None, ["data.name=medical_volumes", f"data.path={tmp_path / 'vols'}", "data.size=16",
                             "data.val_fraction=0.25", "data.test_fraction=0.25", "data.batch_size=6",
                             "model.name=cnn3d_small", "trainer.max_epochs=8", "optimizer.lr=3e-3",
                             "trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                             f"logging.root={tmp_path / 'runs'}"])
    res = runs.train(cfg)
    assert res.summary["data"]["train"] == 12 and res.summary["test"]["test/acc"] >= 0.5
    assert res.history[-1]["train/loss"] < res.history[0]["train/loss"]
