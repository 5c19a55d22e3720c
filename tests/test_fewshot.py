"""Few-shot learning: episodes, prototypes, confidence intervals, Omniglot, and `lamina fewshot` end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lamina.cli.main import main
from lamina.data.base import TensorData
from lamina.data.episodes import EpisodeSampler
from lamina.data.omniglot import omniglot_root
from lamina.errors import ConfigError
from lamina.runs.objectives.fewshot import ProtoNetTask, episode_accuracy, mean_ci95, prototype_logits

FAST = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false", "optimizer.name=adam",
        "optimizer.lr=1e-3", "optimizer.weight_decay=0", "schedule.name=constant", "task.label_smoothing=0"]
HAS_OMNIGLOT = (omniglot_root() / "all_runs.zip").is_file()


def test_prototype_logits_by_hand():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])  # 2 classes x 2 shots, class-major
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    ref = -torch.tensor([[((q - p) ** 2).sum() for p in protos] for q in query])
    torch.testing.assert_close(prototype_logits(support, query, 2, 2), ref)
    assert episode_accuracy(support, torch.tensor([0, 0, 1, 1]), query, torch.tensor([0, 1]), 2, 2) == 1.0


def test_protonet_loss_is_cross_entropy_over_negative_squared_distances():
    torch.manual_seed(0)
    z = torch.randn(2 * 3 + 2 * 4, 5, requires_grad=True)
    batch = {"ways": torch.tensor(2), "shots": torch.tensor(3),
             "y": torch.cat([torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])])}
    loss = ProtoNetTask().loss(z, batch)
    protos = z[:6].reshape(2, 3, 5).mean(1)
    logits = -((z[6:, None, :] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["y"][6:]))
    loss.backward()
    assert z.grad.abs().sum() > 0 and z.grad[:6].abs().sum() > 0  # the support gets gradients through prototypes


def _pool(classes=6, per=10):
    y = torch.arange(classes).repeat_interleave(per)
    return TensorData(x=y.float().reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone(), y=y)


def test_episodes_are_class_major_distinct_and_seeded():
    s = EpisodeSampler(_pool(), ways=3, shots=2, queries=4, episodes=5, seed=1)
    eps = list(s)
    assert len(eps) == 5
    for b in eps:
        assert b["x"].shape == (3 * 6, 1, 2, 2)
        assert b["y"].tolist() == [0, 0, 1, 1, 2, 2] + [0] * 4 + [1] * 4 + [2] * 4
        cls = b["classes"].tolist()
        assert len(set(cls)) == 3
        # every sample's true class is the episode class its label points at
        assert torch.equal(b["x"][:, 0, 0, 0].long(), b["classes"][b["y"]])
    again = list(EpisodeSampler(_pool(), ways=3, shots=2, queries=4, episodes=5, seed=1))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(eps, again))


def test_within_group_episodes_draw_from_one_group():
    s = EpisodeSampler(_pool(6), ways=2, shots=1, queries=1, episodes=20, seed=0, groups={0: 0, 1: 0, 2: 0, 3: 1,
                                                                                        4: 1, 5: 1})
    for b in s:
        g = {int(c) // 3 for c in b["classes"]}
        assert len(g) == 1


@pytest.mark.parametrize("kw, expected", [
    ({"ways": 7}, "7 classes per episode, but the pool has only 6"),
    ({"ways": 1}, "at least 2 classes"),
    ({"shots": 5, "queries": 6}, "5 shots + 6 queries = 11 samples per class, but class 0 has only 10"),
])
def test_impossible_episodes_are_one_line(kw, expected):
    args = {"ways": 3, "shots": 1, "queries": 1, "episodes": 1, **kw}
    with pytest.raises(ConfigError) as e:
        EpisodeSampler(_pool(), **args)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_ci95_by_hand():
    m, h = mean_ci95([0.5, 0.7, 0.9, 0.7])
    sd = math.sqrt(((0.2) ** 2 * 2) / 3)
    assert m == pytest.approx(0.7) and h == pytest.approx(1.96 * sd / 2)


def test_protonet_and_baseline_on_held_out_digits(tmp_path, capsys):
    args = ["fewshot", *FAST, "data.name=digits", "model.name=small_cnn", "model.channels=[32,32]",
            f"logging.root={tmp_path}", "fewshot.episodes=150", "fewshot.test_episodes=100", "fewshot.queries=5",
            "fewshot.train_classes=[0,1,2,3,4]", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["split"]["test"].endswith("held-out classes ['5', '6', '7', '8', '9']")
    proto = r["heads"]["centroid"]
    # 5-way 1-shot on digit classes the encoder never saw: chance is 20%
    assert proto["acc"] > 0.5 and proto["episodes"] == 100 and 0 < proto["ci95"] < 0.1
    assert main([*args[:-1], "fewshot.method=baseline", "trainer.max_epochs=5", "--json"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(b["heads"]) == {"centroid", "logistic"} and b["heads"]["logistic"]["acc"] > 0.5


@pytest.mark.parametrize("extra, expected", [
    (["fewshot.ways=6"], "fewshot.ways: 6 classes per episode, but the pool has only 5"),
    (["fewshot.train_classes=[0,0,1]"], "expected distinct class ids"),
    (["fewshot.train_classes=[0,1,2,3,4,5,6,7,8]"], "leaves 1 class(es) for testing"),
    (["data.name=diabetes", "model.name=mlp"], "needs a classification data set"),
    (["fewshot.method=maml"], "fewshot.method"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, expected):
    rc = main(["fewshot", *FAST, "data.name=digits", "model.name=small_cnn", f"logging.root={tmp_path}",
               "fewshot.episodes=2", "fewshot.test_episodes=2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.skipif(not HAS_OMNIGLOT, reason="datasets/omniglot not in this checkout")
def test_omniglot_sets_and_runs():
    from lamina.data.omniglot import load_background, load_one_shot_runs

    a = load_background("small1")
    assert a.data.x.shape == (136 * 20, 1, 28, 28) and len(a.names) == 136 and len(set(a.alphabets)) == 5
    assert float(a.data.x.max()) == pytest.approx(1.0, abs=0.02) and float(a.data.x.mean()) < 0.2  # strokes on paper
    runs = load_one_shot_runs()
    assert len(runs) == 20
    for r in runs:
        assert r.support.shape == r.query.shape == (20, 1, 28, 28)
        assert sorted(r.answer.tolist()) == list(range(20))  # each support character is asked once


@pytest.mark.skipif(not HAS_OMNIGLOT, reason="datasets/omniglot not in this checkout")
def test_omniglot_protonet_learns_characters_it_never_saw(tmp_path, capsys):
    rc = main(["fewshot", "configs/fewshot_omniglot.yaml", *FAST, f"logging.root={tmp_path}", "fewshot.episodes=60",
               "fewshot.train_ways=10", "fewshot.test_episodes=60", "--json"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Japanese_(katakana)" in r["split"]["test"] and r["heads"]["centroid"]["acc"] > 0.5
    assert r["one_shot_runs"]["trials"] == 400 and r["one_shot_runs"]["error"] < 0.8  # chance: 95% error


def test_anil_adapts_only_the_head_and_differentiates_through_it():
    from lamina.models import create_model
    from lamina.runs.objectives.fewshot import ANILTask

    torch.manual_seed(0)
    model = create_model("small_cnn", in_chans=1, num_classes=7, channels=(8, 8))
    task = ANILTask(model, ways=3, steps=2, lr=0.5)
    assert task.head_names == ["head.weight", "head.bias"]
    batch = next(iter(EpisodeSampler(_pool(6, 10), ways=3, shots=2, queries=2, episodes=1, seed=0)))
    batch["x"] = torch.randn(len(batch["x"]), 1, 8, 8)
    feats = model.forward_features(batch["x"])
    # the inner loop by hand: 2 SGD steps on the support's cross-entropy from the head's current weights
    w, b = model.head.weight, model.head.bias
    for _ in range(2):
        logits = feats[:6].mean((2, 3)) @ w.T + b
        gw, gb = torch.autograd.grad(F.cross_entropy(logits, batch["y"][:6]), (w, b), create_graph=True)
        w, b = w - 0.5 * gw, b - 0.5 * gb
    ref = feats[6:].mean((2, 3)) @ w.T + b
    out = task.forward(model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    task.loss(out, batch).backward()
    # second order: the outer loss reaches the body (through the support features) and the head's init
    assert model.head.weight.grad.abs().sum() > 0 and model.stages[0][0][0].weight.grad.abs().sum() > 0


def test_anil_end_to_end_on_held_out_digits(tmp_path, capsys):
    rc = main(["fewshot", *FAST, "data.name=digits", "model.name=small_cnn", "model.channels=[32,32]",
               f"logging.root={tmp_path}", "fewshot.method=anil", "fewshot.episodes=600", "fewshot.test_episodes=100",
               "trainer.max_epochs=1",
               "fewshot.queries=5", "fewshot.train_classes=[0,1,2,3,4]", "--json"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["heads"]) == {"anil", "centroid"} and r["inner_steps"] == 10
    assert r["heads"]["anil"]["acc"] > 0.4  # 5-way: chance is 20%
