"""lamina.trust.fairness: hand-computed group metrics, parity with fairlearn, FSDD group metadata, reweighting,
and an end-to-end audit + mitigation of a tiny FSDD run."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, needs_shared
from lamina.errors import ConfigError, DataError
from lamina.trust.fairness import ReweightedTask, fairness_report, group_tables, group_weights

# groups A (6 samples) and B (4), classes 0..2
Y_TRUE = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
Y_PRED = [0, 1, 2, 0, 2, 2, 0, 0, 2, 1]
GROUPS = ["A"] * 6 + ["B"] * 4


def test_fairness_report_matches_hand_computed_values():
    r = fairness_report(Y_TRUE, Y_PRED, GROUPS, group_name="g")
    a, b = r["by_group"]["A"], r["by_group"]["B"]
    assert (a["n"], b["n"]) == (6, 4) and r["groups"] == ["A", "B"] and r["worst_group"] == "B"
    assert a["accuracy"] == pytest.approx(5 / 6) and b["accuracy"] == pytest.approx(2 / 4)
    assert r["overall"]["accuracy"] == pytest.approx(7 / 10)
    assert r["accuracy_difference"] == pytest.approx(1 / 3) and r["accuracy_ratio"] == pytest.approx(0.6)
    # macro recall: A (1 + 1/2 + 1) / 3, B (1/2 + 0 + 1) / 3
    assert a["recall_macro"] == pytest.approx(2.5 / 3) and b["recall_macro"] == pytest.approx(0.5)
    # selection rates P(pred = k | group): A 2/6, 1/6, 3/6; B 2/4, 1/4, 1/4
    assert [a["selection_rate"][k] for k in "012"] == pytest.approx([1 / 3, 1 / 6, 1 / 2])
    assert [b["selection_rate"][k] for k in "012"] == pytest.approx([1 / 2, 1 / 4, 1 / 4])
    # one-vs-rest DP difference per class: |2/6 - 2/4|, |1/6 - 1/4|, |3/6 - 1/4|
    dp = [r["per_class"][k]["dp_difference"] for k in "012"]
    assert dp == pytest.approx([1 / 6, 1 / 12, 1 / 4])
    assert r["dp_difference_mean"] == pytest.approx(1 / 6) and r["dp_difference_max"] == pytest.approx(1 / 4)
    # EO = max(TPR gap, FPR gap): class 0 TPR 1 vs 1/2, FPR 0 vs 1/2; class 1 TPR 1/2 vs 0, FPR 0 vs 1/3;
    # class 2 TPR 1 vs 1, FPR 1/4 vs 0
    eo = [r["per_class"][k]["eo_difference"] for k in "012"]
    assert eo == pytest.approx([1 / 2, 1 / 2, 1 / 4])
    assert r["eo_difference_mean"] == pytest.approx(5 / 12) and r["eo_difference_max"] == pytest.approx(1 / 2)
    json.dumps(r)  # json-able


def test_fairness_report_agrees_with_fairlearn_called_directly():
    from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
    from sklearn.metrics import accuracy_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    g = rng.choice(["x", "y", "z"], 300)
    p = np.where(rng.random(300) < np.where(g == "z", 0.5, 0.8), y, rng.integers(0, 4, 300))
    r = fairness_report(torch.from_numpy(y), torch.from_numpy(p), g)
    mf = MetricFrame(metrics={"acc": accuracy_score,
                              "rec": lambda t, q: recall_score(t, q, average="macro", labels=[0, 1, 2, 3])},
                     y_true=y, y_pred=p, sensitive_features=g)
    for grp in "xyz":
        assert r["by_group"][grp]["accuracy"] == pytest.approx(mf.by_group.loc[grp, "acc"])
        assert r["by_group"][grp]["recall_macro"] == pytest.approx(mf.by_group.loc[grp, "rec"])
    assert r["accuracy_difference"] == pytest.approx(mf.difference()["acc"])
    dp = [demographic_parity_difference(y == k, p == k, sensitive_features=g) for k in range(4)]
    eo = [equalized_odds_difference(y == k, p == k, sensitive_features=g) for k in range(4)]
    assert r["dp_difference_mean"] == pytest.approx(np.mean(dp)) and r["eo_difference_max"] == pytest.approx(max(eo))
    assert r["worst_group"] == "z"


def test_group_errors_are_one_line():
    meta = {"groups": {"tensor": "speaker", "speaker": ["a", "b"], "accent": ["X", "Y"]}}
    assert group_tables(meta, "accent") == ("speaker", ["X", "Y"])
    with pytest.raises(ConfigError, match="unknown group 'dialect'.*accent, speaker|unknown group 'dialect'"):
        group_tables(meta, "dialect")
    with pytest.raises(DataError, match="has no group metadata"):
        group_tables({"classes": ["0"]}, "accent", "digits")
    with pytest.raises(DataError, match="equally long"):
        fairness_report([0, 1], [0], ["a", "b"])


def test_group_weights_are_inverse_frequency():
    ids = torch.tensor([0, 1, 1, 2])  # speaker ids; speakers 0, 1 are USA, speaker 2 GRC -> 3 USA, 1 GRC
    per_id, per_value = group_weights(ids, ["USA", "USA", "GRC"])
    assert per_value == pytest.approx({"USA": 4 / (2 * 3), "GRC": 4 / (2 * 1)})
    assert per_id.tolist() == pytest.approx([2 / 3, 2 / 3, 2.0])
    assert per_id[ids].mean().item() == pytest.approx(1.0)  # mean weight 1, equal total weight per group
    assert per_id[ids][:3].sum().item() == pytest.approx(per_id[ids][3:].sum().item())


class _Task:
    name = "toy"
    label_smoothing = 0.1

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["y"], label_smoothing=self.label_smoothing)

    def predict(self, outputs):
        return {"label": outputs.argmax(-1)}


def test_reweighted_loss_is_the_hand_computed_weighted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    batch = {"y": torch.tensor([0, 2, 1, 1]), "speaker": torch.tensor([0, 1, 1, 2])}
    w_id = torch.tensor([0.5, 1.0, 3.0])
    task = ReweightedTask(_Task(), w_id, key="speaker")
    assert task.name == "toy" and task.predict(logits)["label"].tolist() == logits.argmax(-1).tolist()  # delegated
    logp = logits.log_softmax(-1)
    eps, k = 0.1, 3
    ce = [-(1 - eps) * logp[i, batch["y"][i]] - eps / k * logp[i].sum() for i in range(4)]  # smoothed CE
    w = [0.5, 1.0, 1.0, 3.0]
    want = sum(wi * c for wi, c in zip(w, ce)) / sum(w)
    assert task.loss(logits, batch).item() == pytest.approx(want.item(), rel=1e-6)
    # equal weights: the wrapped task's own loss
    assert ReweightedTask(_Task(), torch.ones(3)).loss(logits, batch).item() == pytest.approx(
        _Task().loss(logits, batch).item(), rel=1e-6)
    with pytest.raises(DataError, match="no 'speaker' group tensor"):
        task.loss(logits, {"y": batch["y"]})


@needs_shared("fsdd/recordings")
def test_fsdd_group_metadata_is_aligned_with_file_names():
    from lamina.data import load_dataset
    from lamina.data.multimodal import fsdd_index, fsdd_split

    root = SHARED_DATA / "fsdd"
    plain = load_dataset("fsdd_fusion", path=root, modalities=["text"])
    assert "speaker" not in plain.train.tensors  # default: the splits keep their tensors
    b = load_dataset("fsdd_fusion", path=root, modalities=["text"], groups=True)
    groups = b.meta["groups"]
    assert groups["tensor"] == "speaker" and groups["speaker"] == sorted(groups["speaker"])
    with open(root / "speakers.csv", newline="") as f:
        table = {r["speaker"]: r for r in csv.DictReader(f)}
    assert set(groups["speaker"]) == set(table)
    for i, name in enumerate(groups["speaker"]):
        assert groups["accent"][i] == table[name]["accent"] and groups["gender"][i] == table[name]["gender"]
    index = fsdd_index(root)
    part = fsdd_split(index, "standard", "theo")
    for p, split in enumerate((b.train, b.val, b.test)):
        names = [r[2] for r, q in zip(index, part) if q == p]
        assert [groups["speaker"][i] for i in split.tensors["speaker"].tolist()] == names
        assert torch.equal(split.tensors["y"], plain_split(plain, p).tensors["y"])
    assert sorted({groups["accent"][i] for i in b.test.tensors["speaker"].tolist()}) == [
        "BEL/French", "DEU/German", "GRC/Greek", "USA/neutral"]


def plain_split(bundle, p):
    return (bundle.train, bundle.val, bundle.test)[p]


@needs_shared("fsdd/recordings")
def test_audit_and_reweighting_of_a_tiny_fsdd_run(tmp_path, monkeypatch):
    from lamina.config import validate
    from lamina.runs import train
    from lamina.trust.fairness import audit_fairness, mitigate_run

    monkeypatch.setenv("LAMINA_SHARED_DATA", str(SHARED_DATA))
    # text-only (30% of the words wrong) keeps the test fast: no WAV decoding; the audit code path is the same
    cfg = validate({"name": "fair", "seed": 0,
                    "data": {"name": "fsdd_fusion", "modalities": ["text"], "text_noise": 0.3, "batch_size": 64},
                    "model": {"name": "fusion_classifier", "modality_dropout": 0.0},
                    "task": {"subset_metrics": False},
                    "trainer": {"max_epochs": 1, "threads": 1, "monitor": "val/acc", "monitor_mode": "max"},
                    "logging": {"root": str(tmp_path), "plots": False, "tensorboard": False}})
    run = train(cfg).run_dir  # trained WITHOUT groups=True: the audit reloads the data with the group ids
    rep = audit_fairness(run, group="accent")
    saved = json.loads((run / "fairness.json").read_text())
    assert set(saved["by_group"]) == {"USA/neutral", "DEU/German", "BEL/French", "GRC/Greek"}
    assert [saved["by_group"][g]["n"] for g in ("USA/neutral", "DEU/German", "BEL/French", "GRC/Greek")] == [
        100, 100, 50, 50]
    assert (run / "fairness.png").is_file() and saved["split"] == "test" and saved == json.loads(json.dumps(rep))
    test_acc = json.loads((run / "summary.json").read_text())["test"]["test/acc"]
    assert saved["overall"]["accuracy"] == pytest.approx(test_acc, abs=1e-6)  # same predictions as lamina train
    with pytest.raises(ConfigError, match="unknown group 'dialect'"):
        audit_fairness(run, group="dialect")
    with pytest.raises(ConfigError, match="unknown mitigation method"):
        mitigate_run(run, method="magic")
    out = mitigate_run(run, method="reweight", group="accent")
    assert out["weights"] == pytest.approx({"USA/neutral": 0.75, "DEU/German": 0.75, "BEL/French": 1.5,
                                            "GRC/Greek": 1.5})  # 2400 / (4 * 800 or 4 * 400)
    assert set(out["after"]["by_group"]) == set(saved["by_group"]) and (run / "mitigation.json").is_file()
    assert (run / "fairness_mitigation.png").is_file() and (run / "mitigated-reweight" / "fairness.json").is_file()
