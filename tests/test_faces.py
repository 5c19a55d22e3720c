"""Face recognition: margin logits against the formulas, batch-hard triplets against brute force, verification
metrics against scikit-learn's ROC, the per-person folder loader and its protocols on the ORL database, a short
ArcFace run, and `lamina faces enroll/identify/verify` with their bad-input lines."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from lamina.cli.main import main
from lamina.errors import ConfigError, DataError
from lamina.nn.margin import batch_hard_triplet, margin_logits
from lamina.tasks.faces import FaceTask, pair_scores, verification

ORL = ROOT / "datasets" / "orl_faces"
QUICK = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false"]


def test_arcface_and_cosface_logits_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(64, 7, generator=g) * 2 - 1
    y = torch.randint(0, 7, (64,), generator=g)
    s, m = 30.0, 0.5
    arc = margin_logits(cos, y, "arcface", s, m)
    theta = torch.acos(cos.double())
    for i in range(64):
        t = float(theta[i, y[i]])
        want = math.cos(t + m) if t + m <= math.pi else float(cos[i, y[i]]) - m * math.sin(m)
        assert arc[i, y[i]].item() == pytest.approx(s * want, abs=1e-4)
        others = [c for c in range(7) if c != y[i]]
        assert torch.allclose(arc[i, others], s * cos[i, others])
    cosf = margin_logits(cos, y, "cosface", s, 0.35)
    assert torch.allclose(cosf.gather(1, y[:, None]), s * (cos.gather(1, y[:, None]) - 0.35))
    assert torch.allclose(margin_logits(cos, y, "softmax", s, 0.0), s * cos)
    # past theta + m = pi the fallback keeps falling: a worse angle never earns a larger logit
    c = torch.linspace(-1, 1, 401)[:, None]
    true = margin_logits(c, torch.zeros(401, dtype=torch.long), "arcface", 1.0, 0.5)[:, 0]
    assert (true[1:] >= true[:-1] - 1e-6).all()


def test_batch_hard_triplet_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=-1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5])  # 4 and 5 have no positive
    loss, n = batch_hard_triplet(e, y, 0.2)
    terms = []
    for a in range(12):
        pos = [float((e[a] - e[p]).norm()) for p in range(12) if p != a and y[p] == y[a]]
        neg = [float((e[a] - e[q]).norm()) for q in range(12) if y[q] != y[a]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + 0.2))
    assert int(n) == len(terms) == 10
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_verification_metrics_match_sklearn_roc():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    gen = np.clip(rng.normal(0.6, 0.2, 300), -1, 1)
    imp = np.clip(rng.normal(0.1, 0.2, 3000), -1, 1)
    s = torch.tensor(np.r_[gen, imp], dtype=torch.float32)
    lab = torch.tensor(np.r_[np.ones(300), np.zeros(3000)], dtype=torch.bool)
    r = verification(s, lab)
    fpr, tpr, _ = roc_curve(lab.numpy(), s.numpy())
    assert r["roc_auc"] == pytest.approx(roc_auc_score(lab.numpy(), s.numpy()), abs=1e-4)
    assert r["tar_far_1e-2"] == pytest.approx(tpr[fpr <= 1e-2].max(), abs=1e-6)
    assert r["tar_far_1e-3"] == pytest.approx(tpr[fpr <= 1e-3].max(), abs=1e-6)
    i = np.argmin(np.abs(fpr - (1 - tpr)))
    assert r["eer"] == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=0.01)
    # separable scores: no errors at any threshold in between
    perfect = verification(torch.tensor([0.9, 0.8, 0.1, 0.0, -0.2]), torch.tensor([1, 1, 0, 0, 0]).bool())
    assert perfect["eer"] == 0.0 and perfect["roc_auc"] == 1.0
    assert "tar_far_1e-2" not in perfect  # 3 impostor pairs cannot measure a 1% false-accept rate


def test_pair_scores_cover_every_pair_once():
    e = torch.eye(4)
    s, same = pair_scores(e, torch.tensor([0, 0, 1, 1]))
    assert len(s) == 6 and int(same.sum()) == 2 and torch.all(s == 0)


def test_orl_protocols_split_people_and_images_as_stated():
    from lamina.data import load_dataset

    ident = load_dataset("faces")
    assert ident.task == "face" and ident.num_classes == 40 and ident.input_shape == (1, 56, 46)
    assert len(ident.train) == len(ident.test) == 200 and ident.val is None
    assert torch.equal(torch.bincount(ident.train.y), torch.full((40,), 5))
    files = ident.meta["files"]
    assert not set(files["train"]) & set(files["test"])  # no image in both
    first = load_dataset("faces", selection="first")
    assert first.meta["files"]["train"][:5] == [f"s1/{i}.pgm" for i in range(1, 6)]
    ver = load_dataset("faces", protocol="verification", holdout_identities=10, val_per_person=2)
    assert ver.num_classes == 30 and len(ver.train) == 240 and len(ver.val) == 60 and len(ver.test) == 100
    assert int(ver.test.y.min()) >= 30  # unseen people never share a label with a trained one
    assert not set(ver.meta["classes"]) & set(ver.meta["test_identities"])


def _write(path, arr, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def test_user_folder_of_mixed_sizes_modes_and_formats(tmp_path):
    from lamina.data import load_dataset

    rng = np.random.default_rng(0)
    for p in ("ann", "bob", "cy"):
        _write(tmp_path / p / "a.png", rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))  # colour PNG
        _write(tmp_path / p / "b.jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # JPEG
        _write(tmp_path / p / "c.pgm", rng.integers(0, 255, (200, 150), dtype=np.uint8))  # gray PGM
    b = load_dataset("faces", path=str(tmp_path), train_per_person=2, size=[40, 32])
    assert b.input_shape == (3, 40, 32) and not b.meta["grayscale"] and len(b.train) == 6 and len(b.test) == 3
    g = load_dataset("faces", path=str(tmp_path), train_per_person=2, size=[40, 32], grayscale=True)
    assert g.input_shape == (1, 40, 32)


def test_bad_face_folders_are_one_line_data_errors(tmp_path):
    from lamina.data import load_dataset

    with pytest.raises(DataError, match="face folder not found"):
        load_dataset("faces", path=str(tmp_path / "nope"))
    (tmp_path / "empty" / "ann").mkdir(parents=True)
    with pytest.raises(DataError, match="no person folders with images"):
        load_dataset("faces", path=str(tmp_path / "empty"))
    few = tmp_path / "few"
    for i in range(3):
        _write(few / "ann" / f"{i}.png", np.zeros((20, 20), np.uint8))
    _write(few / "bob" / "0.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match=r"bob: 1 image\(s\); the identification protocol needs"):
        load_dataset("faces", path=str(few), train_per_person=1)
    deep = tmp_path / "deep"
    _write(deep / "ann" / "0.png", np.full((20, 20), 300, np.uint16))
    _write(deep / "ann" / "1.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="16-bit or float"):
        load_dataset("faces", path=str(deep), train_per_person=1)
    tiny = tmp_path / "tiny"
    _write(tiny / "ann" / "0.png", np.zeros((4, 20), np.uint8))
    _write(tiny / "ann" / "1.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="at least 8 pixels"):
        load_dataset("faces", path=str(tiny), train_per_person=1)
    broken = tmp_path / "broken"
    (broken / "ann").mkdir(parents=True)
    (broken / "ann" / "0.jpg").write_bytes(b"not a jpeg")
    _write(broken / "ann" / "1.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset("faces", path=str(broken), train_per_person=1)
    with pytest.raises(ConfigError, match="protocol"):
        load_dataset("faces", protocol="open")
    with pytest.raises(DataError, match="holding out 39"):
        load_dataset("faces", protocol="verification", holdout_identities=39)


def test_face_task_options_are_checked():
    with pytest.raises(ConfigError, match="task.loss"):
        FaceTask(5, loss="sphereface")
    with pytest.raises(ConfigError, match="task.scale"):
        FaceTask(5, scale=0)
    with pytest.raises(ConfigError, match="identities_per_batch"):
        FaceTask(5, loss="triplet", identities_per_batch=1)


def test_identity_batches_hold_p_people_by_k_images():
    from lamina.data import load_dataset
    from lamina.data.faces import identity_batches

    b = load_dataset("faces")
    batches = list(identity_batches(b.train, 8, 4, seed=0))
    assert len(batches) == math.ceil(200 / 32)
    for batch in batches:
        counts = torch.bincount(batch["y"], minlength=40)
        assert int((counts > 0).sum()) == 8 and set(counts[counts > 0].tolist()) == {4}


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    from lamina import runs
    from lamina.config import load_config

    root = tmp_path_factory.mktemp("faces")
    cfg = load_config(ROOT / "configs" / "orl_faces_arcface.yaml",
                      ["trainer.max_epochs=30", "model.backbone_options={channels: [16, 32, 64]}", "data.size=[28,24]",
                       "model.embed_dim=32", *QUICK, f"logging.root={root}"])
    return runs.train(cfg)


def test_short_arcface_run_identifies_orl_faces(face_run):
    t = face_run.summary["test"]
    # 40 people, chance 2.5%; 30 short epochs on 28x24 images already separate most (full config: 96.5%)
    assert t["test/top1"] > 0.6 and t["test/gallery_top1"] > 0.6
    assert 0 <= t["test/eer"] < 0.25 and t["test/roc_auc"] > 0.85 and "test/tar_far_1e-2" in t


def test_triplet_and_cosface_runs_train(tmp_path):
    from lamina import runs
    from lamina.config import load_config

    for loss in ("triplet", "cosface"):
        cfg = load_config(ROOT / "configs" / "orl_faces_verify.yaml",
                          ["trainer.max_epochs=2", "model.backbone_options={channels: [8, 16]}", "data.size=[28,24]",
                           f"task.loss={loss}", "task.identities_per_batch=8", *QUICK, f"logging.root={tmp_path}",
                           f"name={loss}"])
        t = runs.train(cfg).summary["test"]
        assert "test/eer" in t and "test/top1" not in t  # verification test people are unknown to the head


def test_enroll_identify_verify_from_the_cli(face_run, tmp_path, capsys):
    run = str(face_run.run_dir)
    gal = tmp_path / "g.json"
    assert main(["faces", "enroll", run, str(ORL), "--out", str(gal), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["people"] == 40 and r["images"] == 400 and -1 < r["threshold"] < 1
    g = json.loads(gal.read_text())
    assert len(g["people"]) == 40 and len(g["people"][0]["template"]) == 32
    probes = [str(ORL / f"s{p}" / f"{i}.pgm") for p in (3, 17, 29) for i in (2, 9)]
    assert main(["faces", "identify", run, str(gal), *probes, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hits = sum(row["candidates"][0]["name"] == f"s{p}" for row, p in zip(rows, (3, 3, 17, 17, 29, 29)))
    assert hits >= 5  # enrolled from all ten images of each person: the probes are among them
    assert main(["faces", "verify", run, probes[0], probes[1], "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert main(["faces", "verify", run, probes[0], probes[2], "--json", "--threshold", "0.5"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert same["score"] > diff["score"] and diff["threshold"] == 0.5
    # a face of nobody enrolled: with a threshold of 1.0 nothing matches
    assert main(["faces", "identify", run, str(gal), probes[0], "--threshold", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["match"] is None


def test_faces_cli_bad_input_is_one_line_exit_2(face_run, tmp_path, capsys):
    run = str(face_run.run_dir)
    img = str(ORL / "s1" / "1.pgm")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lamina_gallery": 1, "embed_dim": 7, "image_size": [28, 24], "people": []}))
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({"lamina_gallery": 1, "embed_dim": 32, "image_size": [28, 24],
                               "people": [{"name": "x", "template": [float("nan")] * 32}]}).replace("NaN", "NaN"))
    cases = [(["faces", "identify", run, str(bad), img], "invalid JSON"),
             (["faces", "identify", run, str(wrong), img], "enrol again with this run"),
             (["faces", "identify", run, str(nan), img], "finite"),
             (["faces", "identify", run, str(tmp_path / "none.json"), img], "gallery not found"),
             (["faces", "verify", run, img, str(tmp_path / "x.png")], "image not found"),
             (["faces", "enroll", run, str(tmp_path / "nobody"), "--out", str(tmp_path / "o.json")],
              "face folder not found"),
             (["faces", "enroll", run, str(ORL), "--out", str(tmp_path / "o.json"), "--far", "2"], "--far")]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()  # nothing written half
    other = tmp_path / "digits"
    from lamina import runs
    from lamina.config import load_config

    res = runs.train(load_config(None, ["trainer.max_epochs=1", *QUICK, f"logging.root={other}"]))
    assert main(["faces", "verify", str(res.run_dir), img, img]) == 2
    assert "a face run (task face) is needed" in capsys.readouterr().err
