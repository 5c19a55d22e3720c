"""Continual learning: streams, reservoir replay, EWC's Fisher, LwF, task masks, ACC/BWT, and `lamina continual`.

Numeric parts are checked against PyTorch's own ops or hand-computed values; the end-to-end tests train the digits
MLP on a 5-experience Split stream (a few seconds) and check what the literature says must happen: naive
fine-tuning forgets everything in class-incremental learning, replay does not.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from lamina.cli.main import main
from lamina.data.base import TensorData
from lamina.data.streams import class_groups, make_stream
from lamina.errors import ConfigError
from lamina.runs.continual import parse_strategies, seen_accuracy, stream_metrics
from lamina.runs.objectives.continual import (ContinualTask, EWCAnchors, ReservoirBuffer, check_buffer, masked_cross_entropy,
                                              per_sample_fisher)
from lamina.tasks.classification import ClassificationTask

FAST = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false", "model.name=mlp",
        "model.dropout=0", "optimizer.name=adam", "optimizer.lr=1e-3", "optimizer.weight_decay=0",
        "schedule.name=constant", "task.label_smoothing=0", "data.batch_size=32", "trainer.max_epochs=3"]


# ----- numerics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_masked_cross_entropy_matches_pytorch(ls):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 1])
    everything = torch.ones(6, 5, dtype=torch.bool)
    ref = F.cross_entropy(logits, y, label_smoothing=ls)
    torch.testing.assert_close(masked_cross_entropy(logits, y, everything, ls), ref, rtol=1e-6, atol=1e-6)
    # rows restricted to classes {1, 3}: the same as cross-entropy over those two columns with remapped labels
    y2 = torch.tensor([1, 3, 3, 1, 1, 3])
    allowed = torch.zeros(6, 5, dtype=torch.bool)
    allowed[:, [1, 3]] = True
    sub = logits[:, [1, 3]]
    ref2 = F.cross_entropy(sub, (y2 == 3).long(), label_smoothing=ls)
    torch.testing.assert_close(masked_cross_entropy(logits, y2, allowed, ls), ref2, rtol=1e-6, atol=1e-6)


def test_reservoir_keeps_every_sample_with_equal_probability():
    n, cap, runs = 200, 20, 400
    counts = torch.zeros(n)
    for seed in range(runs):
        buf = ReservoirBuffer(cap, seed)
        for start in range(0, n, 37):  # uneven chunks, like batches of experiences
            idx = torch.arange(start, min(start + 37, n))
            buf.add(idx.float().unsqueeze(1), idx, exp=start // 37)
        assert len(buf) == cap and buf.x.shape == (cap, 1)  # bounded: preallocated once, never grows
        kept = buf.y.tolist()
        assert len(set(kept)) == cap  # no sample twice
        counts[kept] += 1
    p = counts / runs
    # Algorithm R: P(kept) = cap / n = 0.1 for every position; early and late halves alike (std of a half's mean
    # ~ sqrt(0.1 * 0.9 / (400 * 100)) = 0.0015)
    assert abs(p[:100].mean() - 0.1) < 0.01 and abs(p[100:].mean() - 0.1) < 0.01
    assert p.min() > 0.02 and p.max() < 0.2


def test_reservoir_fills_in_order_and_records_origin():
    buf = ReservoirBuffer(5, 0)
    buf.add(torch.arange(3.0).unsqueeze(1), torch.arange(3), exp=0)
    assert len(buf) == 3 and buf.y[:3].tolist() == [0, 1, 2] and buf.exp[:3].tolist() == [0, 0, 0]
    buf.add(torch.arange(3.0, 5.0).unsqueeze(1), torch.arange(3, 5), exp=1)
    assert buf.y.tolist() == [0, 1, 2, 3, 4] and buf.exp.tolist() == [0, 0, 0, 1, 1]


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


@pytest.mark.parametrize("masked", [False, True])
def test_fisher_equals_a_loop_of_per_sample_gradients(masked):
    model = _tiny_model()
    model.train()
    model(torch.randn(16, 4))  # non-trivial BatchNorm running stats
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    allowed = None
    if masked:
        allowed = torch.ones(10, 3, dtype=torch.bool)
        allowed[:, 2] = False
        y = y.clamp(max=1)
    fisher = per_sample_fisher(model, x, y, allowed, chunk=4)
    assert model.training  # restored
    model.eval()
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i:i + 1])
        if masked:
            logits = logits.masked_fill(~allowed[i:i + 1], float("-inf"))
        F.cross_entropy(logits, y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.pow(2) / len(x)
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-5, atol=1e-7)


def test_ewc_penalty_and_lwf_term_by_hand():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    fisher = {"weight": torch.tensor([[1.0, 0.0], [0.5, 2.0]])}
    star = {"weight": torch.tensor([[0.0, 2.0], [1.0, 4.0]])}
    anchors = EWCAnchors()
    anchors.add(fisher, star)
    t = ContinualTask(ClassificationTask(2), ewc=anchors, ewc_lambda=3.0, model=model)
    # sum F (theta - theta*)^2 = 1*1 + 0 + 0.5*4 + 0 = 3
    assert float(t.ewc_penalty().detach()) == pytest.approx(3.0)
    # a second anchor: the merged quadratic equals the explicit sum over anchors, value and gradient
    fisher2 = {"weight": torch.tensor([[2.0, 1.0], [0.0, 0.25]])}
    star2 = {"weight": torch.tensor([[1.5, -1.0], [7.0, 0.0]])}
    anchors.add(fisher2, star2)
    explicit = sum((f["weight"] * (model.weight - a["weight"]).pow(2)).sum()
                   for f, a in ((fisher, star), (fisher2, star2)))
    merged = t.ewc_penalty()
    assert float(merged.detach()) == pytest.approx(float(explicit.detach()), rel=1e-6)
    g1 = torch.autograd.grad(merged, model.weight)[0]
    g2 = torch.autograd.grad(explicit, model.weight)[0]
    torch.testing.assert_close(g1, g2)
    assert anchors.tensors() == 2  # A and m for the one parameter, however many experiences
    new, old = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[0.0, 1.0, -5.0]])
    t2 = ContinualTask(ClassificationTask(3), old_groups=[[0, 1]], lwf_temperature=2.0)
    p_old = torch.softmax(torch.tensor([0.0, 0.5]), 0)
    p_new = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    kl = float((p_old * (p_old.log() - p_new.log())).sum())  # KL of T-softened outputs over the old classes only
    assert float(t2.lwf_term(new, old)) == pytest.approx(kl, rel=1e-5)


def test_task_masks_score_each_row_among_its_experience():
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    t = ContinualTask(ClassificationTask(4), exp_masks=masks)
    model = torch.nn.Identity()
    logits = torch.tensor([[0.0, 1.0, 9.0, 9.0], [9.0, 9.0, 2.0, 1.0]])
    with torch.no_grad():
        out = t.forward(model, {"x": logits, "y": torch.tensor([1, 2]), "exp": torch.tensor([0, 1])})
    assert out.argmax(-1).tolist() == [1, 2]  # the 9s belong to the other experience and are masked out
    with torch.no_grad():
        unmasked = ContinualTask(ClassificationTask(4)).forward(model, {"x": logits, "y": torch.tensor([1, 2])})
    assert unmasked.argmax(-1).tolist() == [2, 0]


# ----- streams and metrics -----------------------------------------------------------------------------
def test_split_and_permuted_streams():
    assert class_groups(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert class_groups(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert class_groups(4, 2, [3, 1, 0, 2]) == [[3, 1], [0, 2]]
    x, y = torch.arange(40.0).reshape(10, 1, 2, 2), torch.arange(10) % 4
    data = TensorData(x=x, y=y)
    exps = make_stream("split", data, None, data, 4, 2)
    assert [sorted(set(e.train.y.tolist())) for e in exps] == [[0, 1], [2, 3]]
    assert sum(len(e.train) for e in exps) == 10
    perm = make_stream("permuted", data, None, data, 4, 3, seed=1)
    assert torch.equal(perm[0].train.x, x)  # the first experience is the original task
    p = perm[1].permutation
    assert sorted(p.tolist()) == [0, 1, 2, 3] and torch.equal(perm[1].train.x.reshape(10, -1), x.reshape(10, -1)[:, p])
    assert torch.equal(perm[2].test.y, y)  # labels untouched
    again = make_stream("permuted", data, None, data, 4, 3, seed=1)
    assert torch.equal(again[2].permutation, perm[2].permutation)  # seeded


@pytest.mark.parametrize("call, expected", [
    (lambda: class_groups(10, 11), "allows 1..10 experiences"),
    (lambda: class_groups(4, 2, [0, 1, 1, 3]), "exactly once"),
    (lambda: check_buffer(70000, 55000), "buffer_size: 70000 is larger than the stream's 55000"),
    (lambda: parse_strategies("naive,foo"), "unknown strategy 'foo'"),
    (lambda: parse_strategies("ewc,ewc"), "named twice"),
])
def test_bad_stream_settings_are_one_line(call, expected):
    with pytest.raises(ConfigError) as e:
        call()
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_acc_bwt_forgetting_by_hand():
    m = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.3, 0.6, 0.7]]
    r = stream_metrics(m)
    assert r["acc"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert r["bwt"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert r["forgetting"] == pytest.approx([0.6, 0.2])
    assert seen_accuracy(m) == pytest.approx([0.9, 0.65, (0.3 + 0.6 + 0.7) / 3])
    assert "bwt" not in stream_metrics([[0.8, 0.9]])  # a joint run has one row


# ----- end to end ----------------------------------------------------------------------------------------
def test_class_incremental_naive_forgets_and_replay_remembers(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["continual", *FAST, f"logging.root={tmp_path}", "continual.buffer_size=200",
               "--strategies", "naive,replay,joint", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    naive, replay, joint = (s["strategies"][k] for k in ("naive", "replay", "joint"))
    # class-incremental fine-tuning predicts only the last experience's classes (van de Ven et al. 2022: ~20%)
    assert naive["acc"] < 0.3 and naive["bwt"] < -0.7
    assert replay["acc"] > naive["acc"] + 0.3 and replay["bwt"] > naive["bwt"] + 0.3
    assert joint["acc"] > 0.85 and len(joint["matrix"]) == 1
    assert replay["memory"]["buffer_samples"] == 200
    for k in ("naive", "replay", "joint"):
        assert (out / k / "stream.json").is_file() and (out / k / "accuracy_matrix.png").is_file()
    assert (out / "comparison.png").is_file()
    # the run folder is a lamina run: eval opens its last checkpoint (test split = all 10 classes)
    rc = main(["eval", str(out / "replay"), "--json"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = next(v for k, v in ev.items() if k.endswith("acc"))
    # the whole test set is the union of the experiences' test sets: its accuracy is their size-weighted mean
    st = json.loads((out / "replay" / "stream.json").read_text())
    weighted = sum(a * n for a, n in zip(st["matrix"][-1], st["test_sizes"])) / sum(st["test_sizes"])
    assert acc == pytest.approx(weighted, abs=1e-6)


def test_ewc_and_lwf_keep_what_naive_forgets(tmp_path, capsys):
    out = tmp_path / "class"
    # strong settings make the effect unmistakable on a 5-second run: EWC pins the old weights (and then cannot
    # learn much new: the stability-plasticity trade-off), LwF keeps some old outputs
    rc = main(["continual", *FAST, f"logging.root={tmp_path}", "continual.ewc_lambda=1e6", "continual.lwf_alpha=40",
               "continual.ewc_samples=200", "--strategies", "naive,ewc,lwf", "--out", str(out), "--json",
               "logging.plots=false"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["strategies"]
    assert s["naive"]["bwt"] < -0.8 and s["ewc"]["bwt"] > s["naive"]["bwt"] + 0.5
    assert s["ewc"]["matrix"][-1][0] > 0.5 and s["naive"]["matrix"][-1][0] == 0.0  # experience 0 still known
    assert s["lwf"]["acc"] > s["naive"]["acc"] + 0.03
    # 4 past experiences merged into one quadratic: (A, m) x 3 Linear x (weight, bias)
    assert s["ewc"]["memory"]["ewc_anchors"] == 4 and s["ewc"]["memory"]["ewc_tensors"] == 2 * 3 * 2
    assert not (out / "naive" / "accuracy_matrix.png").exists()


def test_task_incremental_scores_each_head(tmp_path, capsys):
    rc = main(["continual", *FAST, f"logging.root={tmp_path}", "continual.scenario=task", "continual.strategy=ewc",
               "continual.ewc_samples=100", "--json"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 2-way heads on digits: every head stays near perfect, where class-incremental naive scores 0 on old ones
    assert r["scenario"] == "task" and min(r["matrix"][-1]) > 0.9 and r["acc"] > 0.95


def test_permuted_stream_runs_domain_incremental(tmp_path, capsys):
    rc = main(["continual", *FAST, f"logging.root={tmp_path}", "continual.stream=permuted",
               "continual.scenario=domain", "continual.experiences=3", "trainer.max_epochs=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "naive: ACC" in out and "BWT" in out


@pytest.mark.parametrize("args, expected", [
    (["continual.strategy=foo"], "continual.strategy"),
    (["--strategies", "naive,sgd"], "--strategies: unknown strategy 'sgd'"),
    (["continual.strategy=replay", "continual.buffer_size=100000"], "continual.buffer_size: 100000 is larger"),
    (["continual.experiences=11"], "allows 1..10 experiences"),
    (["continual.stream=permuted"], "domain-incremental"),
    (["data.name=diabetes"], "classification"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, expected):
    rc = main(["continual", *FAST, f"logging.root={tmp_path}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err


def test_a_batchnorm_cnn_with_channels_last_streams_too(tmp_path, capsys):
    # any zoo classifier: small_cnn (BatchNorm, NHWC); replayed samples join its batches, EWC's Fisher runs in
    # eval mode through torch.func, and short experiences get BatchNorm recalibration as short runs do
    rc = main(["continual", *FAST, "model.name=small_cnn", "trainer.channels_last=true", "trainer.max_epochs=2",
               f"logging.root={tmp_path}", "continual.buffer_size=200", "continual.ewc_samples=100",
               "--strategies", "replay,ewc", "--out", str(tmp_path / "cnn"), "--json", "logging.plots=false"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["strategies"]
    assert s["replay"]["acc"] > 0.4 and s["replay"]["matrix"][-1][-1] > 0.8 and s["ewc"]["matrix"][-1][-1] > 0.8
