"""Imbalanced binary classification: focal loss against its formula (and cross-entropy at gamma 0), PR-AUC against
scikit-learn, recall at a fixed false-positive rate and threshold choice against brute force, under/over-sampling
row by row, the table loader's bad-schema lines, and a short CLI run on the thyroid table whose PR-AUC and F1 at the
validation-chosen threshold would fall if the weighting or the threshold logic broke."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from lamina.cli.main import main
from lamina.data import load_dataset
from lamina.data.imbalance import resample_indices
from lamina.errors import ConfigError, DataError
from lamina.tasks.binary import BinaryTask, at_threshold, choose_threshold, focal_loss, ranking_metrics

THYROID = ROOT / "datasets" / "thyroid0387" / "thyroid.csv.gz"
QUICK = ["--no-progress", "logging.tensorboard=false", "logging.plots=false", "cost.energy=false", "cost.flops=false"]


def _scores(n=2000, prevalence=0.02, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2.5 * y - 3)))  # positives score higher, with overlap
    return torch.tensor(s, dtype=torch.float32), torch.tensor(y)


# ----- losses ----------------------------------------------------------------------------------------------
def test_focal_loss_matches_its_formula_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    y = torch.tensor([0, 1, 0])
    p = torch.softmax(logits, -1)
    pt = [float(p[i, y[i]]) for i in range(3)]
    gamma = 2.0
    want = sum(-((1 - q) ** gamma) * math.log(q) for q in pt) / 3
    assert float(focal_loss(logits, y, gamma)) == pytest.approx(want, rel=1e-6)
    w = torch.tensor([1.0, 4.0])
    ws = [float(w[c]) for c in y]
    want_w = sum(wi * -((1 - q) ** gamma) * math.log(q) for wi, q in zip(ws, pt)) / sum(ws)
    assert float(focal_loss(logits, y, gamma, w)) == pytest.approx(want_w, rel=1e-6)
    # an easy example (p_t 0.95) is down-weighted by (0.05)^2 = 1/400 relative to cross-entropy
    easy = torch.tensor([[math.log(0.95 / 0.05), 0.0]])
    assert float(focal_loss(easy, torch.tensor([0]), 2.0)) == pytest.approx(0.05 ** 2 * -math.log(0.95), rel=1e-5)


def test_focal_loss_is_cross_entropy_at_gamma_zero():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 2, generator=g), torch.randint(0, 2, (64,), generator=g)
    w = torch.tensor([0.3, 7.0])
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    torch.testing.assert_close(focal_loss(logits, y, 0.0, w), F.cross_entropy(logits, y, weight=w))


def test_class_weights_balanced_and_cost():
    t = BinaryTask(["0", "1"], [900, 100], class_weight="balanced")
    assert t.pos == 1 and t.weight.tolist() == pytest.approx([1000 / 1800, 1000 / 200])
    t = BinaryTask(["no", "yes"], [100, 900], class_weight="cost", cost_fn=25, cost_fp=2)
    assert t.pos == 0 and t.weight.tolist() == [25.0, 2.0]  # the rarer class is the positive one
    t = BinaryTask(["0", "1"], [900, 100], class_weight=[1, 3], loss="focal", gamma=0)
    logits, y = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    torch.testing.assert_close(t.loss(logits, {"y": y}), F.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0])))


# ----- metrics ---------------------------------------------------------------------------------------------
def test_pr_auc_and_roc_auc_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _scores()
    m = ranking_metrics(s, y)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-5)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-5)
    assert ranking_metrics(s, torch.zeros_like(y)) == {}  # one class: no ranking to measure


def _brute_recall_at_fpr(s, y, fpr):
    best = 0.0
    neg, pos = int((y == 0).sum()), int(y.sum())
    for t in [*sorted(set(s.tolist())), math.inf]:
        pred = s >= t
        if int((pred & (y == 0)).sum()) / neg <= fpr:
            best = max(best, int((pred & (y == 1)).sum()) / pos)
    return best


@pytest.mark.parametrize("fpr", [0.001, 0.01, 0.1])
def test_recall_at_fixed_fpr_matches_brute_force(fpr):
    s, y = _scores(n=1500, prevalence=0.05, seed=1)
    s = (s * 200).round() / 200  # ties: many rows share a score
    got = ranking_metrics(s, y, fprs=(fpr,))[f"recall_fpr_{fpr:g}"]
    assert got == pytest.approx(_brute_recall_at_fpr(s, y, fpr), abs=1e-6)


def test_threshold_choice_matches_brute_force():
    s, y = _scores(n=800, prevalence=0.05, seed=2)
    s = (s * 100).round() / 100
    cands = [*sorted(set(s.tolist())), math.nextafter(float(s.max()), math.inf)]
    f1 = {t: at_threshold(s, y, t)["f1"] for t in cands}
    t = choose_threshold(s, y, "max_f1")
    assert f1[t] == pytest.approx(max(f1.values()))
    cost = {c: at_threshold(s, y, c, cost_fn=30, cost_fp=1)["cost"] for c in cands}
    t = choose_threshold(s, y, "min_cost", cost_fn=30, cost_fp=1)
    assert cost[t] == pytest.approx(min(cost.values()))
    # false alarms priced out: no false positive is worth it (the top scores may still be all positives)
    t = choose_threshold(s, y, "min_cost", cost_fn=1, cost_fp=1e6)
    assert int(((s >= t) & (y == 0)).sum()) == 0
    assert choose_threshold(s, torch.zeros_like(y), "min_cost") > float(s.max())  # nothing to find: no alarm


def test_at_threshold_by_hand():
    s = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1])
    y = torch.tensor([1, 0, 1, 1, 0])
    m = at_threshold(s, y, 0.75, cost_fn=10, cost_fp=1)  # TP 1 (0.9), FP 1 (0.8), FN 2
    assert m == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 2 / 5, "cost": (10 * 2 + 1) / 5})


# ----- sampling --------------------------------------------------------------------------------------------
def test_undersampling_keeps_every_minority_row_and_a_seeded_majority_subset():
    y = torch.tensor([0] * 50 + [1] * 5 + [0] * 45)
    idx = resample_indices(y, "under", ratio=2.0, seed=3)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)  # sorted, no repeats
    assert set(torch.nonzero(y == 1).reshape(-1).tolist()) <= set(idx.tolist())
    assert int((y[idx] == 0).sum()) == 10 and int((y[idx] == 1).sum()) == 5
    assert torch.equal(idx, resample_indices(y, "under", ratio=2.0, seed=3))
    assert not torch.equal(idx, resample_indices(y, "under", ratio=2.0, seed=4))


def test_oversampling_repeats_only_minority_rows():
    y = torch.tensor([0] * 40 + [1] * 4)
    idx = resample_indices(y, "over", ratio=1.0, seed=0)
    counts = torch.bincount(idx, minlength=len(y))
    assert counts[:40].tolist() == [1] * 40  # every majority row exactly once
    assert bool((counts[40:] >= 1).all()) and int(counts[40:].sum()) == 40  # minority: all kept, up to 40
    assert int((y[idx] == 1).sum()) == 40 and torch.equal(idx, idx.sort().values)
    assert len(resample_indices(y, "over", ratio=4.0)) == 40 + 10


def test_resample_is_a_table_option_on_the_training_split_only():
    b = load_dataset("table", path=THYROID, target="hyperthyroid", drop=["record_id", "diagnosis"],
                     resample="under", resample_ratio=3)
    full = load_dataset("table", path=THYROID, target="hyperthyroid", drop=["record_id", "diagnosis"])
    pos = int(full.train.y.sum())
    assert b.meta["class_counts"] == [3 * pos, pos] and b.meta["resample"] == {"mode": "under", "ratio": 3.0}
    assert torch.equal(b.test.y, full.test.y) and torch.equal(b.val.x, full.val.x)
    assert full.meta["class_counts"] == torch.bincount(full.train.y).tolist()


# ----- bad input -------------------------------------------------------------------------------------------
def _csv(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = "amount,kind,fraud\n" + "".join(f"{i * 1.5},{'ab'[i % 2]},{int(i % 7 == 0)}\n" for i in range(30))


@pytest.mark.parametrize("text,options,says", [
    (GOOD.replace("\n3.0,a,0\n", "\n3.0,a,\n"), {}, "target 'fraud' is missing (empty or NaN) in 1 row(s), "
     "first row 4; fill them, or pass missing_target=drop"),
    (GOOD.replace("\n3.0,a,0\n", "\n3.0,a,NaN\n"), {}, "first row 4"),
    (GOOD.replace("\n4.5,b,0\n", "\n4.5x,b,0\n"), {}, "column 'amount', row 5: '4.5x' is not a number, but 29 "
     "of its 30 values are"),
    ("amount,fraud\n" + "1,1\n" * 12, {}, "target 'fraud' has a single class '1'"),
    (GOOD, {"drop": ["amout"]}, "drop column 'amout' not found (did you mean 'amount'?)"),
    (GOOD, {"resample": "smote"}, "resample: expected 'under', 'over' or none, got 'smote'"),
    (GOOD, {"resample": "under", "resample_ratio": 0.5}, "resample_ratio: expected a number >= 1"),
    (GOOD, {"missing_target": "ignore"}, "missing_target: expected 'error' or 'drop'"),
])
def test_bad_tables_are_one_data_error_line(tmp_path, text, options, says):
    with pytest.raises(DataError) as e:
        load_dataset("table", path=_csv(tmp_path, text), target="fraud", **options)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_targets_can_be_dropped(tmp_path):
    p = _csv(tmp_path, GOOD.replace("\n3.0,a,0\n", "\n3.0,a,\n"))
    b = load_dataset("table", path=p, target="fraud", missing_target="drop", val_fraction=0, test_fraction=0)
    assert len(b.train) == 29


def test_binary_task_options_are_checked():
    with pytest.raises(ConfigError, match="task.loss: expected one of ce, focal, got 'hinge'"):
        BinaryTask(["0", "1"], [9, 1], loss="hinge")
    with pytest.raises(ConfigError, match="task.class_weight: expected none, balanced, cost or"):
        BinaryTask(["0", "1"], [9, 1], class_weight="auto")
    with pytest.raises(ConfigError, match="task.label_smoothing: the focal loss has no label smoothing"):
        BinaryTask(["0", "1"], [9, 1], loss="focal", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"task.threshold: expected one of max_f1, min_cost or a probability"):
        BinaryTask(["0", "1"], [9, 1], threshold="best")
    with pytest.raises(ConfigError, match=r"task.fprs: expected a number in \(0, 1\), got 2"):
        BinaryTask(["0", "1"], [9, 1], fprs=[0.01, 2])
    with pytest.raises(ConfigError, match="task.positive: class 'fraud' is not one of the data's classes"):
        BinaryTask(["0", "1"], [9, 1], positive="fraud")


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    three = _csv(tmp_path, "a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(30)), "three.csv")
    nan = _csv(tmp_path, GOOD.replace("\n3.0,a,0\n", "\n3.0,a,\n"), "nan.csv")
    cases = [
        (["data.name=table", f"data.path={three}", "data.target=y", "task.name=binary"],
         "config error: task.name: binary needs a target with exactly 2 classes; data set 'table' has 3 (0, 1, 2); "
         "use task.name=classification"),
        (["data.name=table", f"data.path={nan}", "data.target=fraud", "task.name=binary"],
         f"data error: {nan}: target 'fraud' is missing (empty or NaN) in 1 row(s), first row 4; fill them, or "
         "pass missing_target=drop (data.missing_target=drop) to leave those rows out"),
        (["data.name=table", f"data.path={nan}", "data.target=fraud", "data.missing_target=drop", "task.name=binary",
          "task.class_weight=auto"], "config error: task.class_weight: expected none, balanced, cost or [w_0, w_1] "
         "(positive numbers), got 'auto'"),
    ]
    for args, want in cases:
        assert main(["train", *args, "model.name=mlp", "trainer.max_epochs=1", *QUICK]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [want]


# ----- end to end ------------------------------------------------------------------------------------------
def test_thyroid_cli_run_threshold_on_val_and_predict(tmp_path, capsys):
    """A short run of configs/thyroid_hyper.yaml: PR-AUC far above the 2.5% prevalence, the F1-maximizing
    threshold chosen on validation (not 0.5, which balanced weights make far too eager) gives the test F1, and
    `lamina predict` applies the saved threshold."""
    args = ["train", str(ROOT / "configs" / "thyroid_hyper.yaml"), f"data.path={THYROID}", "trainer.max_epochs=6",
            "data.batch_size=256", "task.class_weight=balanced", f"logging.root={tmp_path}", "name=t", *QUICK]
    assert main(args) == 0
    run = tmp_path / "t"
    s = json.loads((run / "summary.json").read_text())["test"]
    thr = json.loads((run / "threshold.json").read_text())
    assert s["test/pr_auc"] > 0.5 and s["test/roc_auc"] > 0.9  # a random scorer: 0.025 and 0.5
    assert thr["rule"] == "max_f1" and thr["threshold"] == s["test/threshold"] and thr["threshold"] > 0.6
    assert s["test/f1"] > 0.5 and s["test/recall_fpr_0.01"] > 0.3
    # at 0.5 the balanced weights flag far more rows: the chosen threshold must beat it on validation F1
    from lamina.runs.open import open_run

    r = open_run(run)
    assert r.task.threshold == thr["threshold"]
    vs, vy = r.task.split_scores(r.model, r.data().val, "cpu")
    assert thr["val"]["f1"] >= at_threshold(vs, vy, 0.5)["f1"]
    # predict: a complete row scored at the run's threshold
    import pandas as pd

    df = pd.read_csv(THYROID).drop(columns=["record_id", "diagnosis", "hyperthyroid", "TBG"])
    rows = df.dropna().iloc[:20]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "rows.csv"), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with torch.no_grad():
        preds = r.task.predict(r.model(**_encode(r, rows)))
    assert [o["class"] for o in out] == [r.facts.class_names[i] for i in preds["label"].tolist()]


def _encode(run, rows):
    from lamina.data.files import transform_table_rows

    t = transform_table_rows(run.facts.meta, rows)
    run.model.eval()
    return {"x": t["x"], "x_cat": t["x_cat"]}
